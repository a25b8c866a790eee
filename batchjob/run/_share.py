"""Runs on one API key share it: one run sends at a time, and together they keep under the
key's daily limit. Both go through the run store, so they hold across processes and machines
that share it (docs/store.md, "One API key, many runs").

- :class:`KeyLease`: a lease with a heartbeat. A run waits for it before its first request;
  a holder that dies stops renewing it, and the next run takes it over within
  ``lease_timeout`` seconds. A holder that cannot renew it in time stops sending (exit 3)
  rather than risk two runs at once.
- :class:`DailyBudget`: requests counted per key and UTC day, reserved a few at a time; a
  run stops before crossing ``daily_budget`` (exit 3), its keys pending for tomorrow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

from batchjob._config import JobConfig
from batchjob._errors import StoreError
from batchjob.run._incremental import api_of
from batchjob.run._stop import StopRequest
from batchjob.send import RequestGate
from batchjob.store import Store


def key_name(config: JobConfig) -> str:
    """What names the API key whose limits runs share: ``api_key``, or else the client id,
    or else the API itself (every run of this store against it)."""
    key = config.api_key or config.client_id or "*"
    return f"{api_of(config)} key={key}"


class KeyLease:
    """One run at a time sends with the key (see the module's note)."""

    def __init__(
        self, store: Store, name: str, holder: str, timeout: float, log: Any, gate: RequestGate
    ) -> None:
        self._store = store
        self._name = name
        self._holder = holder
        self._timeout = timeout
        self._log = log
        self._gate = gate
        self._renewed = 0.0
        self._beat: asyncio.Task[None] | None = None

    async def acquire(self, stop: StopRequest) -> bool:
        """Wait for the lease; False if the run is asked to stop first."""
        told = dead = ""
        while not stop.event.is_set():
            try:
                mine, holder = await asyncio.to_thread(
                    self._store.lease, self._name, self._holder, self._timeout, dead
                )
                if not mine and not dead and await asyncio.to_thread(self._died, holder):
                    dead = holder  # killed on this machine: no need to wait out its lease
                    continue
            except StoreError as exc:
                mine, holder = False, f"(the store: {exc})"
            if mine:
                self._renewed = time.monotonic()
                if told:
                    self._log.info("key.lease_taken", key=self._name)
                self._beat = asyncio.create_task(self._heartbeat())
                return True
            if holder != told:
                told = holder
                self._log.info("key.waiting", key=self._name, holder=holder)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.event.wait(), min(1.0, self._timeout / 4))
        return False

    def _died(self, holder: str) -> bool:
        info = self._store.run(holder)
        return info is not None and info.state == "died"

    async def _heartbeat(self) -> None:
        every = self._timeout / 3
        while True:
            await asyncio.sleep(every)
            try:
                mine, holder = await asyncio.to_thread(
                    self._store.lease, self._name, self._holder, self._timeout
                )
            except StoreError as exc:
                self._log.warning("key.lease_renewal_failed", error=str(exc))
                mine, holder = False, ""
                if time.monotonic() - self._renewed < self._timeout - every:
                    continue  # still ours for a while: try again
            if mine:
                self._renewed = time.monotonic()
                continue
            why = (
                f"run {holder} took over the API key ({self._name})"
                if holder
                else f"the run store could not renew this run's lease on the API key in "
                f"{self._timeout:g} s"
            )
            self._gate.close(f"{why}; stopped so that two runs never send at once")
            return

    async def release(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self._store.release, self._name, self._holder)


class DailyBudget:
    """Requests per key and UTC day, counted in the store (an :class:`Allowance`)."""

    def __init__(self, store: Store, name: str, limit: int, chunk: int) -> None:
        self._store = store
        self._name = name
        self._limit = limit
        self._chunk = max(1, chunk)
        self._day = ""
        self._left = 0

    def take(self) -> str:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        if day != self._day:
            self._day, self._left = day, 0  # a new day: yesterday's reservation is void
        if self._left == 0:
            try:
                self._left = self._store.spend(self._name, day, self._chunk, self._limit)
            except StoreError as exc:
                return f"the daily request budget cannot be counted: {exc}"
            if self._left == 0:
                return (
                    f"the API key's daily budget is spent: {self._limit} requests on {day} "
                    "(UTC), across every run of this store on the key (daily_budget); the keys "
                    "left are pending for tomorrow"
                )
        self._left -= 1
        return ""

    def give_back(self) -> None:
        """Return what was reserved and not sent, for the next run today."""
        if self._left and self._day:
            with contextlib.suppress(StoreError):
                self._store.unspend(self._name, self._day, self._left)
            self._left = 0
