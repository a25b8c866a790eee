"""Planning requests: chunking and isolating bad keys never lose or duplicate a key."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjob.run._isolate import Group, KeyIsolator, chunk, group_size_for


@given(n=st.integers(0, 2_000), size=st.integers(1, 500))
def test_chunking_keeps_every_key_once_in_order(n: int, size: int) -> None:
    positions = np.arange(n, dtype=np.int64)
    chunks = list(chunk(positions, size))
    assert all(1 <= len(c) <= size for c in chunks)
    assert np.array_equal(np.concatenate(chunks) if chunks else positions, positions)
    assert len(chunks) == -(-n // size)


def test_group_size_follows_bad_share() -> None:
    assert group_size_for(0.0, 100) == 100
    assert group_size_for(0.01, 100) == 64
    assert group_size_for(0.001, 100) == 100
    assert group_size_for(0.3, 100) == 2
    assert group_size_for(0.6, 100) == 1


def _run(
    n: int, bad: set[int], batch: int, concurrency: int, rng: random.Random
) -> tuple[int, set[int], dict[int, str], list[list[int]]]:
    """Drive an isolator against an oracle; answers arrive in random order."""
    isolator: KeyIsolator[str] = KeyIsolator(np.arange(n, dtype=np.int64), batch)
    requests: list[list[int]] = []
    undone: set[int] = set()
    blamed: dict[int, str] = {}
    in_flight: list[Group] = []
    while not isolator.done:
        while len(in_flight) < concurrency:
            group = isolator.next_group()
            if group is None:
                break
            in_flight.append(group)
        assert in_flight, "isolator is stuck: not done, yet nothing to send"
        group = in_flight.pop(rng.randrange(len(in_flight)))
        keys = [int(p) for p in group.positions]
        requests.append(keys)
        if bad.intersection(keys):
            result = isolator.record_refused(group.id, f"request {len(requests)}")
        else:
            result = isolator.record_ok(group.id)
        for key in result.undone:
            assert int(key) not in undone, "a key was reported undone twice"
            undone.add(int(key))
        for key, failure in result.bad:
            assert key not in blamed
            blamed[key] = failure
    return len(requests), undone, blamed, requests


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 600),
    bad_share=st.floats(0, 1),
    batch=st.integers(1, 120),
    concurrency=st.integers(1, 6),
    seed=st.integers(0, 2**32),
)
def test_isolation_undoes_every_good_key_and_blames_exactly_the_bad_ones(
    n: int, bad_share: float, batch: int, concurrency: int, seed: int
) -> None:
    rng = random.Random(seed)
    bad = {k for k in range(n) if rng.random() < bad_share}
    _, undone, blamed, requests = _run(n, bad, batch, concurrency, rng)
    assert undone == set(range(n)) - bad
    assert set(blamed) == bad
    assert all(len(r) <= batch for r in requests)
    # A blamed key's request really held a bad key (the blame points at a refusal).
    for failure in blamed.values():
        index = int(failure.split()[1]) - 1
        assert bad.intersection(requests[index])


def test_a_clean_event_costs_exactly_one_request_per_batch() -> None:
    count, undone, blamed, _ = _run(1_050, set(), 100, 4, random.Random(1))
    assert count == 11
    assert len(undone) == 1_050 and not blamed


def test_one_percent_bad_keys_cost_well_under_plain_halving() -> None:
    # 10,000 keys, 100 bad: plain halving costs ~1,280 requests, the floor is ~803.
    rng = random.Random(7)
    bad = set(rng.sample(range(10_000), 100))
    count, undone, blamed, _ = _run(10_000, bad, 100, 4, rng)
    assert len(undone) == 9_900 and set(blamed) == bad
    assert count <= 950


def test_too_large_shrinks_batches_and_keeps_keys() -> None:
    isolator: KeyIsolator[str] = KeyIsolator(np.arange(10, dtype=np.int64), 8)
    first = isolator.next_group()
    assert first is not None and len(first.positions) == 8
    isolator.record_too_large(first.id)
    assert isolator.max_batch == 4
    seen: list[int] = []
    while (group := isolator.next_group()) is not None:
        assert len(group.positions) <= 4
        seen.extend(int(p) for p in isolator.record_ok(group.id).undone)
    assert sorted(seen) == list(range(10)) and isolator.done


def test_leftovers_hand_back_everything_not_settled() -> None:
    isolator: KeyIsolator[str] = KeyIsolator(np.arange(300, dtype=np.int64), 100)
    refused = isolator.next_group()
    in_flight = isolator.next_group()
    assert refused is not None and in_flight is not None
    isolator.record_refused(refused.id, "404")
    untested, suspects = isolator.leftovers()
    returned = isolator.record_no_verdict(in_flight.id)
    everything = sorted(
        [int(p) for p in untested]
        + [int(p) for group, _ in suspects for p in group]
        + [int(p) for p in returned]
    )
    assert everything == list(range(300))
    assert suspects[0][1] == "404"
    assert isolator.done


def test_a_refusal_that_is_not_about_keys_never_gets_a_good_key_blamed() -> None:
    # A server that answers 400 to any request above 40 keys, as if a key were bad.
    isolator: KeyIsolator[int] = KeyIsolator(
        np.arange(500, dtype=np.int64), 100, needs_proof=lambda status: status != 404
    )
    undone: set[int] = set()
    blamed: list[int] = []
    sent = 0
    while not isolator.done:
        group = isolator.next_group()
        assert group is not None
        sent += 1
        assert sent < 2_000, "isolation does not converge"
        if len(group.positions) > 40:
            result = isolator.record_refused(group.id, 400)
        else:
            result = isolator.record_ok(group.id)
        undone.update(int(p) for p in result.undone)
        blamed.extend(k for k, _ in result.bad)
    assert undone == set(range(500)) and not blamed


def test_a_413_on_half_of_a_refused_group_does_not_loop() -> None:
    # Keys are checked before size: the 100-key group gets 404, its half of 50 gets 413.
    isolator: KeyIsolator[int] = KeyIsolator(np.arange(100, dtype=np.int64), 100)
    bad = 77
    sent = 0
    undone: set[int] = set()
    blamed: set[int] = set()
    while not isolator.done:
        group = isolator.next_group()
        assert group is not None
        sent += 1
        assert sent < 100, "the same keys keep coming back"
        keys = {int(p) for p in group.positions}
        if bad in keys:
            result = isolator.record_refused(group.id, 404)
        elif len(keys) > 30 and sent > 1:
            isolator.record_too_large(group.id)
            continue
        else:
            result = isolator.record_ok(group.id)
        undone.update(int(p) for p in result.undone)
        blamed.update(k for k, _ in result.bad)
    assert blamed == {bad} and undone == set(range(100)) - {bad}


def test_groups_in_flight_before_a_413_do_not_shrink_the_batch_again() -> None:
    isolator: KeyIsolator[int] = KeyIsolator(np.arange(1_000, dtype=np.int64), 100)
    in_flight = [isolator.next_group() for _ in range(4)]
    for group in in_flight:
        assert group is not None
        isolator.record_too_large(group.id)
    assert isolator.max_batch == 50
