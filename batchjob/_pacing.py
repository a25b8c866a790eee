"""Pacing: requests spaced evenly at a rate that adapts to the server's 429 ``throttled``.

The per-second limit belongs to the API key, and other integrations may share that key, so the
rate actually left for us can be lower than configured and can change during a run. The pacer
starts at the configured rate (never goes above it) and, like AWS's adaptive retry mode,
decreases multiplicatively when throttled and climbs back additively:

* Decrease: by the share of recent answers that were throttled, so a lone 429 caused by
  network jitter costs a few percent while "half our requests are refused" halves the rate at
  once. Only one decrease per round: answers to requests sent before the last decrease
  describe the old rate and are ignored.
* Increase: quickly back towards the rate at which throttling last began (it was fine just
  below it), then slowly past it, in case the other integration has gone quiet.

Even spacing uses aiolimiter's leaky bucket with capacity one request, so there is never a
burst. Its rate is fixed at construction; a rate change swaps in a new bucket right after a
request took its slot (under a lock), so the change neither bursts nor wastes a slot.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

#: Called as on_change(old_rate, new_rate, reason) whenever the rate changes noticeably.
RateListener = Callable[[float, float, str], None]


@dataclass(frozen=True)
class PacingSettings:
    min_rate: float = 0.05  # requests/s; never slower, so a run always progresses
    window: float = 2.0  # seconds of recent answers that judge how hard we are throttled
    recovery: float = 0.5  # share of the gap to the last good rate closed per second
    probe: float = 0.01  # share of max_rate added per second once past the last good rate
    backoff_floor: float = 0.5  # the most one decrease may cut (x0.5)
    safety: float = 0.97  # settle this far below the rate at which throttling began


class AdaptivePacer:
    """Grants send slots evenly spaced at :attr:`rate` requests per second."""

    def __init__(
        self,
        max_rate: float,
        settings: PacingSettings | None = None,
        *,
        on_change: RateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rate <= 0:
            raise ValueError("max_rate must be positive")
        self.max_rate = max_rate
        self.settings = settings or PacingSettings()
        self._rate = max_rate
        self._limiter = AsyncLimiter(1, 1.0 / max_rate)
        self._pending_rate: float | None = None
        self._lock = asyncio.Lock()
        self._clock = clock
        self._on_change = on_change
        self._answers: deque[tuple[float, bool]] = deque()  # (answered at, throttled?)
        self._last_decrease = float("-inf")
        self._last_update = clock()
        self._good_rate: float | None = None  # just below where throttling last began
        self._reported_rate = max_rate
        self.throttled_count = 0

    @property
    def rate(self) -> float:
        return self._pending_rate if self._pending_rate is not None else self._rate

    async def acquire(self) -> float:
        """Wait for the next slot; returns the clock time at which it was granted."""
        async with self._lock:
            await self._limiter.acquire()
            if self._pending_rate is not None:
                self._rate, self._pending_rate = self._pending_rate, None
                # A fresh bucket is empty; fill it now so the next slot is a full interval
                # after this one, at the new rate.
                self._limiter = AsyncLimiter(1, 1.0 / self._rate)
                await self._limiter.acquire()
            return self._clock()

    def on_answer(self, sent_at: float, *, throttled: bool) -> None:
        """Learn from one answer to a request that got its slot at ``sent_at``."""
        now = self._clock()
        self._answers.append((now, throttled))
        horizon = now - self.settings.window
        while self._answers and self._answers[0][0] < horizon:
            self._answers.popleft()
        if throttled:
            self.throttled_count += 1
            if sent_at >= self._last_decrease:
                self._decrease(now)
        elif sent_at >= self._last_decrease:
            self._increase(now)

    def _decrease(self, now: float) -> None:
        s = self.settings
        share = sum(1 for _, t in self._answers if t) / len(self._answers)
        current = self.rate
        self._good_rate = current * s.safety
        new = max(s.min_rate, current * max(s.backoff_floor, min(s.safety, 1.0 - share)))
        self._last_decrease = now
        self._last_update = now
        self._set(new, "throttled")

    def _increase(self, now: float) -> None:
        s = self.settings
        elapsed = now - self._last_update
        self._last_update = now
        current = self.rate
        if current >= self.max_rate:
            return
        target = self._good_rate
        if target is not None and current < target:
            new = current + (target - current) * min(1.0, s.recovery * elapsed)
            new = max(new, current + s.probe * self.max_rate * elapsed)
        else:
            new = current + s.probe * self.max_rate * elapsed
        self._set(min(self.max_rate, new), "recovering")

    def _set(self, new: float, reason: str) -> None:
        if new == self.rate:
            return
        self._pending_rate = new
        # Report only changes worth a log line (5%), not every small step of the climb.
        if self._on_change is not None and abs(new - self._reported_rate) >= 0.05 * max(
            self._reported_rate, 1e-9
        ):
            self._on_change(self._reported_rate, new, reason)
            self._reported_rate = new
