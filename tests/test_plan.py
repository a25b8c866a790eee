"""Planning: duplicates merged, invalid rows kept, events and keys in input order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batchjob._inputs import read_inputs
from batchjob._plan import build_plan
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
