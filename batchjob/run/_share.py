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
from batchjob.store import Store


def key_name(config: JobConfig) -> str:
    """What names the API key whose limits runs share: ``api_key``, or else the client id,
    or else the API itself (every run of this store against it)."""
    key = config.api_key or config.client_id or "*"
    return f"{api_of(config)} key={key}"


class KeyLease:
    """One run at a time sends with the key (see the module's note).

    The gate asks :meth:`take` before every request: the lease is good until
    ``lease_timeout`` after the start of the last renewal that succeeded, whatever the
    heartbeat is doing (a renewal that hangs on a network split must not let a run send past
    its lease while another run takes it over).
    """

    #: Seconds kept back from the lease's end: a request granted just before it is on its way.
    margin = 1.0

    def __init__(self, store: Store, name: str, holder: str, timeout: float, log: Any) -> None:
        self._store = store
        self._name = name
        self._holder = holder
        self._timeout = timeout
        self._log = log
        self._valid_until = 0.0
        self._lost = ""
        self._beat: asyncio.Task[None] | None = None

    def take(self) -> str:
        if self._lost:
            return self._lost
        if time.monotonic() >= self._valid_until:
            return (
                f"this run's lease on the API key ({self._name}) ran out before the run store "
                "renewed it; stopped so that two runs never send at once"
            )
        return ""

    async def _renew(self, dead: str = "") -> tuple[bool, str]:
        began = time.monotonic()
        mine, holder = await asyncio.to_thread(
            self._store.lease, self._name, self._holder, self._timeout, dead
        )
        if mine:
            margin = min(self.margin, self._timeout / 4)
            self._valid_until = max(self._valid_until, began + self._timeout - margin)
        return mine, holder

    async def acquire(self, stop: StopRequest, give_up_after: float = 60.0) -> str:
        """Wait for the lease: "" once it is this run's, else why not (the run was asked to
        stop, or the store failed for ``give_up_after`` seconds on end)."""
        told = dead = ""
        failing_since: float | None = None
        while not stop.event.is_set():
            try:
                mine, holder = await self._renew(dead)
                failing_since = None
                if not mine and not dead and await asyncio.to_thread(self._died, holder):
                    dead = holder  # killed on this machine: no need to wait out its lease
                    continue
            except StoreError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > give_up_after:
                    return f"the run store cannot give this run the API key's lease: {exc}"
                mine, holder = False, "(the run store is failing)"
            if mine:
                if told:
                    self._log.info("key.lease_taken", key=self._name)
                self._beat = asyncio.create_task(self._heartbeat())
                return ""
            if holder != told:
                told = holder
                self._log.info("key.waiting", key=self._name, holder=holder)
            # Often: the key is idle from the holder's release to this check (a fifth of a
            # second is under 1 % of a night's sending, and a cheap query for the store).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.event.wait(), min(0.2, self._timeout / 4))
        return stop.reason or "stopped while waiting for the API key"

    def _died(self, holder: str) -> bool:
        info = self._store.run(holder)
        return info is not None and info.state == "died"

    async def _heartbeat(self) -> None:
        every = self._timeout / 3
        while not self._lost:
            await asyncio.sleep(every)
            try:
                mine, holder = await self._renew()
            except StoreError as exc:
                self._log.warning("key.lease_renewal_failed", error=str(exc))
                continue  # take() stops the sending once the lease runs out
            if not mine:
                self._lost = (
                    f"run {holder} took over the API key ({self._name}); stopped so that two "
                    "runs never send at once"
                )

    async def release(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        self._lost = self._lost or "the run released the API key"
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self._store.release, self._name, self._holder)


class Allowances:
    """Several allowances as one: the first that refuses says why."""

    def __init__(self, *parts: Any) -> None:
        self._parts = [p for p in parts if p is not None]

    def take(self) -> str:
        for part in self._parts:
            refused: str = part.take()
            if refused:
                return refused
        return ""


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
            except StoreError:
                # Once more after a moment (a dropped connection is opened again), then stop:
                # a budget that cannot be counted cannot be kept.
                time.sleep(0.2)
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
