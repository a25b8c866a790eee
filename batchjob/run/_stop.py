"""Stopping a run gracefully: a StopRequest, and the signal handlers that set it."""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
from collections.abc import Callable
from typing import Any

from batchjob._errors import ExitCode


class StopRequest:
    """Set from a signal handler (or by an orchestrator) to stop the run gracefully.

    :meth:`hurry` (a second Ctrl-C) cuts the grace period short: requests in flight are
    cancelled, and their keys reported as sent without an answer.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.hurried = asyncio.Event()
        self.reason = ""
        self.exit_code: int = ExitCode.SIGINT

    def request(self, reason: str, exit_code: int) -> None:
        if not self.event.is_set():
            self.reason, self.exit_code = reason, exit_code
            self.event.set()

    def hurry(self) -> None:
        """Stop now: waiting for answers in flight is not worth it any more."""
        self.hurried.set()

    def signal(self, reason: str, exit_code: int, *, may_hurry: bool = True) -> None:
        """A signal: the first stops gracefully, a later one (``may_hurry``) hurries."""
        if self.event.is_set():
            if may_hurry:
                self.hurry()
        else:
            self.request(reason, exit_code)


def install_signal_handlers(stop: StopRequest) -> Callable[[], None]:
    """SIGINT/SIGTERM (cron, systemd, Kubernetes) and SIGHUP (a closed terminal, an ssh drop)
    stop the run gracefully; a second SIGINT or SIGTERM hurries it. Returns an undo.

    A signal this process was started with ignored (``nohup``, ``&`` in a script) stays
    ignored. SIGHUP never hurries: one hangup can arrive twice (the kernel, then the shell).
    Outside the main thread nothing is installed: signals belong to the host (an orchestrator's
    worker thread), which can stop the run with its own StopRequest.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []  # (signal, what to restore)
    wanted = [(signal.SIGINT, ExitCode.SIGINT), (signal.SIGTERM, ExitCode.SIGTERM)]
    hangup = getattr(signal, "SIGHUP", None)  # Windows has none
    if hangup is not None:
        wanted.append((hangup, ExitCode.SIGHUP))
    for sig, code in wanted:
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:
            continue
        handle = functools.partial(
            stop.signal, f"interrupted by {sig.name}", code, may_hurry=sig != hangup
        )
        try:
            loop.add_signal_handler(sig, handle)
            installed.append((sig, None))
        except NotImplementedError:
            # Windows' loops cannot: a plain handler, which hands the signal to the loop.
            signal.signal(sig, _handing_to(loop, handle))
            installed.append((sig, previous))

    def remove() -> None:
        for sig, previous in installed:
            if previous is None:
                loop.remove_signal_handler(sig)
            else:
                signal.signal(sig, previous)

    return remove


def _handing_to(
    loop: asyncio.AbstractEventLoop, handle: Callable[[], None]
) -> Callable[[int, Any], None]:
    def handler(_signum: int, _frame: Any) -> None:
        loop.call_soon_threadsafe(handle)

    return handler
