"""Planning: duplicates merged, invalid rows kept, events and keys in input order."""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchjob.plan._plan as plan_module
from batchjob.plan import Plan, build_plan
from batchjob.plan._plan import Hashes
from batchjob.read import Words, read_inputs
from tests.support import write_csv

A = "07216444-4e3b-41ea-a3b8-5a418fce41f4"
B = "8f0a3c2e-1b4d-4e5f-9a6b-7c8d9e0f1a2b"


def test_repeats_merge_and_events_keep_input_order(tmp_path: Path) -> None:
    rows = [(B, "k1"), (A, "k2"), (B, "k1"), (A, "k1"), (B, "k3"), ("bad", "k9"), ("bad", "k9")]
    plan = build_plan(
        read_inputs([write_csv(tmp_path / "in.csv", rows, ("event_id", "ticket_key"))])
    )
    assert list(zip(plan.rows.event_id, plan.rows.order_ticket_key, strict=True)) == [
        (B, "k1"), (A, "k2"), (A, "k1"), (B, "k3"), ("bad", "k9"),
    ]  # fmt: skip
    assert plan.duplicates == 2
    assert list(plan.events) == [B, A]
    assert [plan.keys_at(p) for p in plan.events.values()] == [["k1", "k3"], ["k2", "k1"]]
    assert np.array_equal(plan.invalid, [4])


def test_a_malformed_row_never_hides_a_good_row_for_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    # The first data row has one field too many: it is reported invalid, and must not
    # swallow the good row after it as a "duplicate".
    path.write_text(f"event_id,ticket_key\n{A},abc123,extra\n{A},abc123\n")
    plan = build_plan(read_inputs([path]))
    assert len(plan.rows) == 2
    assert plan.rows.problem[0] != "" and plan.rows.problem[1] == ""
    assert [plan.keys_at(p) for p in plan.events.values()] == [["abc123"]]


# --- finding repeats: the hashed fast path and its fallbacks ----------------------------------

C = "0f0e0d0c-0b0a-4909-8807-060504030201"


def plan_of(tmp_path: Path, rows: Sequence[Sequence[str]]) -> Plan:
    path = tmp_path / "in.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["event_id", "ticket_key"])
        writer.writerows(rows)
    return build_plan(read_inputs([path]))


def expected_plan(rows: Sequence[Sequence[str]]) -> tuple[list[int], dict[str, list[str]]]:
    """What a plan must hold, worked out one row at a time: (kept row numbers, keys by event).

    A row with too many fields or a bad event is unusable; unusable rows only repeat unusable
    rows; rows without a key never repeat anything.
    """
    seen: set[tuple[str, bool, str]] = set()
    kept: list[int] = []
    events: dict[str, list[str]] = {}
    for number, row in enumerate(rows):
        event, key = row[0].strip().lower(), row[1].strip()
        usable = len(row) == 2 and event in (A, B, C) and key != ""
        if key and (event, usable, key) in seen:
            continue
        seen.add((event, usable, key))
        kept.append(number)
        if usable:
            events.setdefault(event, []).append(key)
    return kept, events


def assert_plan_is(plan: Plan, rows: Sequence[Sequence[str]]) -> None:
    kept, events = expected_plan(rows)
    assert plan.rows["source_row"].tolist() == [number + 2 for number in kept]
    assert plan.duplicates == len(rows) - len(kept)
    assert {event: plan.keys_at(p) for event, p in plan.events.items()} == events
    assert list(plan.events) == list(events)  # events in the order they first appear
    assert plan.keys.to_pylist() == plan.rows["order_ticket_key"].tolist()


@pytest.fixture
def exact_path_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the plan falls back to the exact path: these inputs must take the hashed one."""

    def forbidden(*_: object) -> None:
        raise AssertionError("the exact path was taken")

    monkeypatch.setattr(plan_module, "_exact_repeats", forbidden)


@pytest.mark.usefixtures("exact_path_forbidden")
def test_equal_length_keys_repeat_within_an_event_not_across_events(tmp_path: Path) -> None:
    rows = [
        (A, "aaaaaaaaaaaa"), (B, "aaaaaaaaaaaa"), (A, "aaaaaaaaaaab"), (A, "aaaaaaaaaaaa"),
        (B, "aaaaaaaaaaaa"), (C, "baaaaaaaaaaa"), (A, "aaaaaaaaaaab"), (C, "aaaaaaaaaaaa"),
    ]  # fmt: skip
    plan = plan_of(tmp_path, rows)
    assert_plan_is(plan, rows)
    assert plan.duplicates == 3


@pytest.mark.usefixtures("exact_path_forbidden")
def test_keys_of_every_length_repeat_only_when_byte_equal(tmp_path: Path) -> None:
    # Short keys (one masked word), exactly one word, a word and a bit, many words; keys that
    # share all but their first or last byte; and empty keys, which never repeat.
    keys = ["a", "ab", "abcdefg", "abcdefgh", "abcdefghi", "bbcdefghi", "abcdefghj", "x" * 17]
    keys += ["y" * 40 + "1", "y" * 40 + "2", "z" + "y" * 40, "é" * 5, "ü" * 5, ""]
    rows = [(event, key) for event in (A, B) for key in keys]
    rows += [(A, key) for key in reversed(keys)] + [(B, key) for key in keys[::3]]
    assert_plan_is(plan_of(tmp_path, rows), rows)


@pytest.mark.usefixtures("exact_path_forbidden")
def test_repeats_that_differ_only_in_being_usable(tmp_path: Path) -> None:
    rows: list[tuple[str, ...]] = [
        (A, "k0000001", "extra"), (A, "k0000001"), (A, "k0000001", "extra"), (A, "k0000001"),
        ("bad", "k0000002"), (A, "k0000002"), ("bad", "k0000002"), ("", "k0000002"),
    ]  # fmt: skip
    plan = plan_of(tmp_path, rows)
    assert_plan_is(plan, rows)
    assert plan.duplicates == 3


def test_keys_too_long_to_hash_take_the_exact_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = Mock(wraps=plan_module._exact_repeats)
    monkeypatch.setattr(plan_module, "_exact_repeats", exact)
    long_key = "k" * (plan_module.LONGEST_HASHED_KEY + 1)
    rows = [(A, long_key), (A, "short"), (A, long_key), (B, long_key)]

    assert_plan_is(plan_of(tmp_path, rows), rows)
    exact.assert_called_once()


def _constant_hash(tags: Hashes, words: Iterable[Words]) -> Hashes:
    for _ in words:
        pass
    tags[:] = 7
    return tags


def _weak_hash(tags: Hashes, words: Iterable[Words]) -> Hashes:
    """Only a few bits of each row: many collisions, and also many true repeats flagged."""
    tags &= np.uint64(1)
    for word in words:
        tags ^= word & np.uint64(3)
    return tags


@pytest.mark.parametrize("fake", [_constant_hash, _weak_hash])
def test_hash_collisions_never_merge_different_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Callable[..., Hashes]
) -> None:
    monkeypatch.setattr(plan_module, "row_hash", fake)
    exact = Mock(wraps=plan_module._exact_repeats)
    monkeypatch.setattr(plan_module, "_exact_repeats", exact)
    rows = [(A, f"key{i % 7:05d}") for i in range(40)] + [(B, "key00001"), (B, "key00002")]

    assert_plan_is(plan_of(tmp_path, rows), rows)
    exact.assert_called_once()  # the collision was found and the exact path took over


def test_true_repeats_under_a_constant_hash_need_no_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every flagged row really is a repeat of its first occurrence: verified, kept fast.
    monkeypatch.setattr(plan_module, "row_hash", _constant_hash)
    rows = [(A, "same-key-1234")] * 5 + [(B, "same-key-1234")] * 3
    plan = plan_of(tmp_path, rows)
    assert_plan_is(plan, rows)
    assert plan.duplicates == 6


_events = st.sampled_from([A, B, C, A.upper(), "bad", ""])
_keys = st.text(alphabet="ab é", max_size=20) | st.sampled_from(["k" * 70, "k" * 64, "abcdefgh"])
_rows = st.lists(
    st.tuples(_events, _keys, st.booleans()).map(
        lambda row: (row[0], row[1], "extra") if row[2] else (row[0], row[1])
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(rows=_rows, hash_name=st.sampled_from(["real", "constant", "weak"]))
def test_any_input_plans_as_one_row_at_a_time_would(
    rows: list[tuple[str, ...]], hash_name: str
) -> None:
    fake = {"real": plan_module.row_hash, "constant": _constant_hash, "weak": _weak_hash}
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as folder:
        patch.setattr(plan_module, "row_hash", fake[hash_name])
        written = [row for row in rows if any(cell.strip() for cell in row)]  # no blank rows
        assert_plan_is(plan_of(Path(folder), written), written)
