"""Pacing: even spacing, never above the configured rate, down on 429 and carefully back up."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from batchjob.send import AdaptivePacer, PacingSettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer_ok(pacer: AdaptivePacer, clock: Clock, count: int, step: float = 0.1) -> None:
    for _ in range(count):
        clock.now += step
        pacer.on_answer(clock.now - step / 2, throttled=False)


class Sent:
    """What a simulated run sent: per request, refused or not, and the real rate it went at."""

    def __init__(self) -> None:
        self.refused: list[bool] = []
        self.rates: list[float] = []
        self.times: list[float] = []

    def share_near(self, granted: float, last: int, margin: float) -> float:
        """Share of the last ``last`` requests sent within ``2 * margin`` under ``granted``."""
        near = [granted * (1 - 2 * margin) <= r <= granted for r in self.rates[-last:]]
        return sum(near) / len(near)


def strict_bucket(
    pacer: AdaptivePacer,
    clock: Clock,
    granted: Callable[[float], float],
    requests: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
) -> Sent:
    """Send ``requests`` as the pacer spaces them to a bucket with no burst allowance that
    grants ``granted(now)`` requests/s, answering each at once. ``noise``: the share refused
    at random before the bucket is asked, as the sandbox's throttle_storm does."""
    return strict_bucket_until(pacer, clock, granted, requests=requests, noise=noise, seed=seed)


def strict_bucket_until(
    pacer: AdaptivePacer,
    clock: Clock,
    granted: Callable[[float], float],
    *,
    requests: int | None = None,
    until: float = float("inf"),
    noise: float | Callable[[float], float] = 0.0,
    seed: int = 0,
) -> Sent:
    """:func:`strict_bucket` for ``requests`` or until the clock reaches ``until``, whichever
    comes first; ``noise`` may depend on the time (a burst of 429s is ``1.0`` for a while)."""
    sent = Sent()
    rng = random.Random(seed)
    last_accepted = float("-inf")

    def share(now: float) -> float:
        return noise(now) if callable(noise) else noise

    for _ in itertools.count() if requests is None else range(requests):
        if clock.now >= until:
            break
        interval = (1.0 + pacer.settings.guard) / pacer.rate
        clock.now += interval
        sent.times.append(clock.now)
        if rng.random() < share(clock.now):
            throttled = True
        else:
            throttled = clock.now - last_accepted < 1.0 / granted(clock.now) - 1e-9
            if not throttled:
                last_accepted = clock.now
        sent.refused.append(throttled)
        sent.rates.append(1.0 / interval)
        pacer.on_answer(clock.now, throttled=throttled)
    return sent


def test_a_throttled_answer_lowers_the_rate_and_it_climbs_back_but_never_above_max() -> None:
    clock = Clock()
    pacer = AdaptivePacer(10.0, clock=clock)
    # Long enough clean for a lone 429 to stand out from the noise that might be: 20 answers
    # are not (a 1 % prior noise share makes one 429 in 20 unremarkable).
    answer_ok(pacer, clock, 100)
    assert pacer.rate == 10.0
    clock.now += 0.1
    pacer.on_answer(clock.now - 0.05, throttled=True)
    lowered = pacer.rate
    assert lowered < 10.0
    answer_ok(pacer, clock, 600)
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


def test_a_lone_429_after_a_clean_streak_costs_one_small_step() -> None:
    clock = Clock()
    pacer = AdaptivePacer(20.0, clock=clock)
    answer_ok(pacer, clock, 50)
    clock.now += 0.05
    pacer.on_answer(clock.now - 0.01, throttled=True)
    assert pacer.rate == 20.0 * (1 - pacer.settings.margin)


def test_refusals_in_a_row_cut_harder_each_time_down_to_the_floor() -> None:
    clock = Clock()
    pacer = AdaptivePacer(100.0, clock=clock)
    rates = []
    for _ in range(5):
        clock.now += 0.1
        pacer.on_answer(clock.now - 0.01, throttled=True)
        rates.append(pacer.rate)
    cuts = [round(1 - b / a, 6) for a, b in itertools.pairwise([100.0, *rates])]
    assert cuts == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_against_half_the_rate_it_settles_just_under_the_granted_rate() -> None:
    clock = Clock()
    pacer = AdaptivePacer(20.0, clock=clock)
    sent = strict_bucket(pacer, clock, lambda now: 10.0, 400)
    assert sum(sent.refused) <= 12  # the search costs a handful of 429s, not a steady share
    assert sent.share_near(10.0, 300, pacer.settings.margin) >= 0.95


def test_at_exactly_the_granted_rate_nothing_is_refused_and_nothing_changes() -> None:
    clock = Clock()
    changes: list[tuple[float, float, str]] = []
    pacer = AdaptivePacer(20.0, clock=clock, on_change=lambda *c: changes.append(c))
    sent = strict_bucket(pacer, clock, lambda now: 20.0, 1000)
    assert not any(sent.refused)
    assert pacer.rate == 20.0
    assert changes == []


def test_a_stable_limit_costs_few_probes_and_a_raised_one_is_found() -> None:
    clock = Clock()
    pacer = AdaptivePacer(40.0, clock=clock)

    def granted(now: float) -> float:
        return 10.0 if now < 200.0 else 30.0  # then the other integration goes quiet

    sent = strict_bucket(pacer, clock, granted, 1900)
    assert sum(sent.refused[100:]) / 1800 <= 0.01  # settled: probing above costs under 1 %
    assert sent.share_near(10.0, 1800, pacer.settings.margin) >= 0.95
    sent = strict_bucket(pacer, clock, granted, 3000)
    assert sent.share_near(30.0, 1000, pacer.settings.margin) >= 0.95
    assert sum(sent.refused) <= 30


def test_the_other_integration_getting_busier_is_followed_down() -> None:
    clock = Clock()
    pacer = AdaptivePacer(20.0, clock=clock)
    strict_bucket(pacer, clock, lambda now: 20.0, 300)
    sent = strict_bucket(pacer, clock, lambda now: 12.0, 600)
    assert sum(sent.refused) <= 12
    assert sent.share_near(12.0, 400, pacer.settings.margin) >= 0.95


def test_random_429s_do_not_drag_the_rate_below_what_is_granted() -> None:
    short = []
    for noise, seed in itertools.product((0.02, 0.05, 0.1), range(30)):
        clock = Clock()
        pacer = AdaptivePacer(20.0, clock=clock)
        sent = strict_bucket(pacer, clock, lambda now: 20.0, 1500, noise=noise, seed=seed)
        near = sum(r >= 0.9 * 20.0 for r in sent.rates[-1000:]) >= 900
        if not near or sum(sent.refused) > 1500 * noise * 1.5 + 15:
            short.append((noise, seed))
    # Every 429 read as "over" took 5 % noise down to a few requests a second for good (89 of
    # these 90 fell short then). Now 12 in 1,200 seeds do, 11 of them at 10 % noise, here
    # (0.02, 16), (0.1, 7) and (0.1, 20): noise that bunches up before anything is proven is
    # still cut like a real excess, and the climb back is a doubling step at a time.
    assert len(short) <= 3, short


def test_under_noise_a_real_limit_is_still_found_and_followed() -> None:
    def granted(now: float) -> float:
        return 10.0 if now < 100.0 else 6.0  # then the other integration gets busier

    found = followed = 0
    for seed in range(10):
        clock = Clock()
        pacer = AdaptivePacer(20.0, clock=clock)
        sent = strict_bucket(pacer, clock, granted, 1000, noise=0.05, seed=seed)
        # Within 5 % under the limit most of the time; probes above it now take two or three
        # 429s to refute, not one, so the share refused is the noise and a few points more.
        near = sent.share_near(10.0, 600, 0.025) >= 0.7
        found += near and sum(sent.refused[-600:]) <= 600 * 0.125
        sent = strict_bucket(pacer, clock, granted, 600, noise=0.05, seed=seed + 100)
        followed += sent.share_near(6.0, 400, 0.025) >= 0.75
    # Not every seed: when the first few 429s at 20/s happen to be noise that bunches up,
    # nothing is proven yet to tell noise from "over", the cuts go far below 10/s, and a
    # ceiling that two close 429s set there holds until a cruise ends (seed 1). Every 429
    # read as "over" (the old pacer) fails all ten.
    assert found >= 8
    assert followed >= 9


def test_429s_at_a_proven_rate_are_counted_as_noise_and_those_of_a_cut_are_not() -> None:
    clock = Clock()
    pacer = AdaptivePacer(20.0, clock=clock)
    prior = pacer.noise()
    for _ in range(6):  # a rate refused at once, again and again: over, not noise
        clock.now += 0.1
        pacer.on_answer(clock.now - 0.01, throttled=True)
    assert pacer.noise() == prior
    answer_ok(pacer, clock, 20)  # proves the rate reached
    proven = pacer.rate
    for _ in range(10):  # one 429 in twenty, at the proven rate
        answer_ok(pacer, clock, 19)
        clock.now += 0.1
        pacer.on_answer(clock.now - 0.01, throttled=True)
    assert pacer.noise() > 0.03
    assert pacer.rate >= proven  # none of them lowered it


def test_a_ceiling_set_by_a_lone_early_429_stops_holding_once_noise_explains_it() -> None:
    clock = Clock()
    pacer = AdaptivePacer(20.0, clock=clock)
    clock.now += 0.1
    pacer.on_answer(clock.now - 0.01, throttled=True)  # at once: read as "over", cut 10 %
    assert pacer.rate == 18.0
    # 18/s then sees one 429 in ten, sparse enough to be noise: the rate is proven there and
    # the noise learnt, so the lone 429 at 20/s no longer holds the rate under it.
    for _ in range(30):
        answer_ok(pacer, clock, 9, step=1 / 18)
        clock.now += 1 / 18
        pacer.on_answer(clock.now - 0.01, throttled=True)
        if pacer.rate == 20.0:
            break
    assert pacer.rate == 20.0


def test_after_a_burst_of_429s_the_rate_is_back_within_two_minutes() -> None:
    # Another app hammers the shared key for 20 s: every request refused, whatever the rate.
    # Each refusal may cut, and at a low rate answers (and so proofs) are seconds apart: this
    # took 9,368 s to get back to 90 % (cut to 0.05/s, then 10 answers a proof and a
    # 300-answer cruise there). The climb back now heads for the last good rate on time.
    clock = Clock()
    pacer = AdaptivePacer(4.0, clock=clock)
    strict_bucket_until(pacer, clock, lambda now: 4.0, until=30.0)
    assert pacer.rate == 4.0

    def burst(now: float) -> float:
        return 1.0 if 30.0 <= now < 50.0 else 0.0

    sent = strict_bucket_until(pacer, clock, lambda now: 4.0, until=50.0, noise=burst)
    assert min(sent.rates) < 1.0  # the burst did cut it well down
    sent = strict_bucket_until(pacer, clock, lambda now: 4.0, until=50.0 + 120.0)
    back = [t for t, r in zip(sent.times, sent.rates, strict=True) if r >= 0.9 * 4.0]
    assert back, f"still at {pacer.rate:.3f}/s two minutes after the burst"
    assert not any(sent.refused[-100:])  # and not by going over the limit
    sent = strict_bucket_until(pacer, clock, lambda now: 4.0, requests=400)
    assert sent.share_near(4.0, 300, pacer.settings.margin) >= 0.95


def test_a_limit_that_really_fell_below_the_burst_floor_is_still_followed() -> None:
    # The floor that a run of cuts stops at must not hold the rate over a limit that is
    # really that low: it halves once per floor_hold of refusals there.
    clock = Clock()
    pacer = AdaptivePacer(4.0, clock=clock)
    strict_bucket_until(pacer, clock, lambda now: 4.0, until=30.0)
    floor = 4.0 * pacer.settings.collapse_floor
    sent = strict_bucket_until(pacer, clock, lambda now: floor / 3, until=30.0 + 400.0)
    hold = pacer.settings.floor_hold
    early = [r for t, r in zip(sent.times, sent.rates, strict=True) if t < 30.0 + 3 * hold]
    assert min(early) <= floor / 2  # not held at the floor for longer than it says
    late = [r for t, r in zip(sent.times, sent.rates, strict=True) if t > 300.0]
    assert sum(r <= floor / 3 for r in late) >= 0.6 * len(late)  # under it, bar probes
    assert pacer.rate <= floor / 3
    assert sum(sent.refused) <= 30


@settings(max_examples=40, deadline=None)
@given(
    st.floats(min_value=0.3, max_value=40.0),
    st.floats(min_value=1.0, max_value=3.0),
    st.floats(min_value=1.0, max_value=120.0),
    st.floats(min_value=0.0, max_value=0.2),
)
def test_recovering_from_a_burst_never_goes_above_the_configured_rate(
    max_rate: float, headroom: float, burst_seconds: float, noise: float
) -> None:
    # The climb back heads for the best rate proven earlier, on time rather than answers: it
    # must still never pass the configured rate, even where the server would allow more.
    clock = Clock()
    pacer = AdaptivePacer(max_rate, clock=clock)

    def storm(now: float) -> float:
        return 1.0 if 20.0 <= now < 20.0 + burst_seconds else noise

    seen: list[float] = []
    for until in range(5, 400, 5):
        sent = strict_bucket_until(
            pacer, clock, lambda now: max_rate * headroom, until=until, noise=storm, seed=until
        )
        seen.extend(sent.rates)
        assert pacer.settings.min_rate <= pacer.rate <= max_rate
    interval = (1.0 + pacer.settings.guard) / max_rate
    assert max(seen) == 1.0 / interval  # it did reach the configured rate, and no more


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=400), st.floats(min_value=0.2, max_value=500.0))
def test_the_rate_stays_between_min_and_max_whatever_the_answers(
    throttled: list[bool], max_rate: float
) -> None:
    clock = Clock()
    pacer = AdaptivePacer(max_rate, clock=clock)
    for refused in throttled:
        clock.now += 1.0 / pacer.rate
        pacer.on_answer(clock.now, throttled=refused)
        assert pacer.settings.min_rate <= pacer.rate <= max_rate


def test_rate_changes_worth_noting_are_reported() -> None:
    clock = Clock()
    changes: list[tuple[float, float, str]] = []
    pacer = AdaptivePacer(10.0, clock=clock, on_change=lambda *c: changes.append(c))
    clock.now = 1.0
    pacer.on_answer(0.9, throttled=True)
    assert changes == [(10.0, 9.0, "throttled")]


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


async def test_a_slow_answer_holds_the_next_slot_back_by_its_delay() -> None:
    pacer = AdaptivePacer(50.0, PacingSettings(guard=0.0))
    loop = asyncio.get_running_loop()
    sent = await pacer.acquire()
    granted = loop.time()
    await asyncio.sleep(0.01)
    # No usual round trip known yet: all 10 ms of this one may have been on the way there.
    pacer.on_answer(sent, throttled=False)
    await pacer.acquire()
    assert loop.time() - granted >= 0.02 + 0.01 - 0.001


async def test_a_decrease_also_spaces_the_slot_already_waiting() -> None:
    pacer = AdaptivePacer(100.0, PacingSettings(guard=0.0))
    loop = asyncio.get_running_loop()
    sent = await pacer.acquire()
    first = loop.time()
    waiting = asyncio.ensure_future(pacer.acquire())
    await asyncio.sleep(0)
    pacer.on_answer(sent, throttled=True)  # now 90/s: the waiting slot must honour that
    await waiting
    second = loop.time()
    third_at = await pacer.acquire()
    assert second - first >= 1 / 90 - 0.001
    assert loop.time() - second >= 1 / 90 - 0.001
    assert third_at > sent
