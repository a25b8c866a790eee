"""Read: input files (CSV/TSV, Excel, ODS) into one normalised frame of rows.

Every row a person put in a file comes back exactly once, usable or with a one-line problem
naming the file, row and column; a file that cannot be used at all raises
:class:`~batchjob.InputError` before anything is sent. What the plan stage may use:
"""

from batchjob.read._files import read_inputs
from batchjob.read._findings import HIDDEN_PROBLEM, Finding, ReadSummary
from batchjob.read._identity import IDENTITY_COLUMN, IDENTITY_SEPARATOR, MAX_IDENTITY_CHARS
from batchjob.read._keybytes import KeyBytes, Offsets, Words, word_count
from batchjob.read._shared import CSV_SUFFIXES, EXCEL_SUFFIXES, FRAME_COLUMNS, MAX_KEY_CHARS, Inputs

__all__ = [
    "CSV_SUFFIXES",
    "EXCEL_SUFFIXES",
    "FRAME_COLUMNS",
    "HIDDEN_PROBLEM",
    "IDENTITY_COLUMN",
    "IDENTITY_SEPARATOR",
    "MAX_IDENTITY_CHARS",
    "MAX_KEY_CHARS",
    "Finding",
    "Inputs",
    "KeyBytes",
    "Offsets",
    "ReadSummary",
    "Words",
    "read_inputs",
    "word_count",
]
