"""Every error batchjob raises on purpose, and the exit codes the command line maps them to.

The hierarchy::

    BatchjobError                 anything batchjob raises on purpose
    ├── UsageError                nothing was sent: fix what the message names (exit 2)
    │   ├── ConfigError           a setting is missing, malformed or unsafe
    │   ├── InputError            an input file cannot be used at all
    │   └── ReportError           the report path cannot be used (exists, locked, unwritable)
    └── TokenError                no usable access token (exit 2 before a run, 3 during one)
        ├── TokenEndpointError    the token endpoint answered with an OAuth error
        ├── TokenSaveError        a refreshed pair could not be saved (it was put elsewhere)
        └── StoppingError         the run is stopping: no refresh is started

A run that starts returns a :class:`~batchjob.RunResult` rather than raising: its outcome is in
the report and ``RunResult.exit_code``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What ``batchjob run`` exits with; the README's exit-code table says what to do."""

    OK = 0  # every key undone (dry run: every row valid)
    INCOMPLETE = 1  # finished, but some key not undone
    FAILED = 1  # `batchjob auth`: no token pair was written (an alias of 1)
    USAGE = 2  # usage, configuration or input error; nothing was sent
    STOPPED = 3  # stopped early: quota, token, budget, internal error
    SIGHUP = 129
    SIGINT = 130
    SIGTERM = 143


class BatchjobError(Exception):
    """Base of every error batchjob raises on purpose."""


class UsageError(BatchjobError):
    """Nothing was sent: the message names what to fix. Exit code 2."""


class ConfigError(UsageError, ValueError):
    """A setting is missing, malformed or unsafe."""


class InputError(UsageError):
    """A file cannot be used at all. The message starts with the file (and sheet)."""


class ReportError(UsageError):
    """The report path cannot be used (exists without --resume, locked, unwritable)."""


class StoreError(UsageError):
    """The run store cannot be opened, read or written; the message names it. Before a run
    sends anything this is exit 2; a store that fails during a run stops it (exit 3)."""


class TokenError(BatchjobError):
    """No usable token: the file is missing or malformed, or the token server said no.

    The message says what to do about it and never contains a token.
    """


class StoppingError(TokenError):
    """The token source is closing (the run stops): no refresh is started or retried."""


class TokenEndpointError(TokenError):
    """The token endpoint answered with an OAuth error (``error`` is its code)."""

    def __init__(self, *, status: int, error: str, detail: str) -> None:
        super().__init__(f"token endpoint answered {status} ({detail})")
        self.status = status
        self.error = error
        self.detail = detail  # "error: description", scrubbed of anything that was sent


class TokenSaveError(TokenError):
    """A refresh was answered but the new pair could not replace the token file.

    The refresh token in the file is spent; the message says where the new pair went. It stops
    the run even while the current access token is still good: someone has to act.
    """
