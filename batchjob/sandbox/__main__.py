import sys

from batchjob.sandbox import main_sandbox

sys.exit(main_sandbox())
