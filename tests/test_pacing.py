"""Pacing: even spacing, never above the configured rate, down on 429 and slowly back up."""

from __future__ import annotations

import asyncio
import itertools

from batchjob._pacing import AdaptivePacer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_throttled_answer_lowers_the_rate_and_it_climbs_back_but_never_above_max() -> None:
    clock = Clock()
    pacer = AdaptivePacer(10.0, clock=clock)
    for _ in range(20):
        clock.now += 0.1
        pacer.on_answer(clock.now - 0.05, throttled=False)
    assert pacer.rate == 10.0
    clock.now += 0.1
    pacer.on_answer(clock.now - 0.05, throttled=True)
    lowered = pacer.rate
    assert lowered < 10.0
    for _ in range(600):
        clock.now += 0.1
        pacer.on_answer(clock.now - 0.05, throttled=False)
    assert lowered < pacer.rate <= 10.0


def test_answers_to_requests_sent_before_a_decrease_do_not_lower_it_again() -> None:
    clock = Clock()
    pacer = AdaptivePacer(10.0, clock=clock)
    clock.now = 1.0
    pacer.on_answer(0.9, throttled=True)
    once = pacer.rate
    pacer.on_answer(0.95, throttled=True)  # sent before the decrease at t=1.0
    assert pacer.rate == once
    clock.now = 1.5
    pacer.on_answer(1.2, throttled=True)  # sent after it: the new rate is still too high
    assert pacer.rate < once


def test_heavy_throttling_cuts_harder_than_a_lone_429() -> None:
    lone, heavy = Clock(), Clock()
    a = AdaptivePacer(10.0, clock=lone)
    b = AdaptivePacer(10.0, clock=heavy)
    for i in range(20):
        lone.now = heavy.now = i * 0.1
        a.on_answer(-1, throttled=False)
        b.on_answer(-1, throttled=i % 2 == 0)
    lone.now = heavy.now = 2.0
    a.on_answer(1.9, throttled=True)
    assert b.rate < a.rate


async def test_slots_are_evenly_spaced_with_no_burst() -> None:
    pacer = AdaptivePacer(50.0)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.05)  # an idle pacer must not have saved up a burst
    times = []
    for _ in range(11):
        await pacer.acquire()
        times.append(loop.time())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.019  # 1/50 s, less timer granularity
