import sys

from batchjob._cli import main

sys.exit(main())
