"""The latest outcome of each identity, worked out from column chunks: the same as replaying
every entry in order, however the entries were split into chunks and folds."""

from __future__ import annotations

import itertools

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjob.store._base import SUCCESS_OUTCOMES, Chunk
from batchjob.store._columns import IDS, IDS_SCHEMA, encode, latest

OUTCOMES = ["undone", "checked_in", "failed", "not_attempted"]

#: (run, identity, outcome, sent) in the order they were recorded.
entries = st.lists(
    st.tuples(
        st.integers(1, 4),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(OUTCOMES),
        st.booleans(),
    ),
    max_size=40,
).map(lambda found: sorted(found, key=lambda e: e[0]))  # runs record in start order


def replay(recorded: list[tuple[int, str, str, bool]]) -> dict[str, tuple[str, int]]:
    """The rule, one entry at a time: an entry never sent does not replace a success."""
    state: dict[str, tuple[str, int]] = {}
    for run, identity, outcome, sent in recorded:
        if not sent and outcome not in SUCCESS_OUTCOMES:
            current = state.get(identity)
            if current is not None and current[0] in SUCCESS_OUTCOMES:
                continue
        state[identity] = (outcome, run)
    return state


def chunks_of(recorded: list[tuple[int, str, str, bool]], cuts: list[int]) -> list[Chunk]:
    chunks = []
    bounds = sorted({0, len(recorded), *(c % (len(recorded) + 1) for c in cuts)})
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        part = recorded[start:end]
        runs = {run for run, *_ in part}
        for run in sorted(runs):  # a chunk belongs to one run
            mine = [e for e in part if e[0] == run]
            table = pa.table(
                {
                    "identity": [e[1] for e in mine],
                    "position": list(range(len(mine))),
                    "outcome": [e[2] for e in mine],
                    "pending": [""] * len(mine),
                    "sent": [e[3] or e[2] in SUCCESS_OUTCOMES for e in mine],
                    "finished_at": [1.0] * len(mine),
                },
                schema=IDS_SCHEMA,
            )
            chunks.append(Chunk(run, number, IDS, encode(table)))
    return chunks


def as_dict(table: pa.Table) -> dict[str, tuple[str, int]]:
    return {
        row["identity"]: (row["outcome"], row["run"])
        for row in table.select(["identity", "outcome", "run"]).to_pylist()
    }


@settings(max_examples=300, deadline=None)
@given(entries, st.lists(st.integers(0, 40), max_size=4), st.integers(0, 40))
def test_chunks_and_folds_agree_with_replaying_every_entry(
    recorded: list[tuple[int, str, str, bool]], cuts: list[int], fold_at: int
) -> None:
    # A success is always sent; the strategy may say otherwise, the recorder never does.
    recorded = [(r, i, o, s or o in SUCCESS_OUTCOMES) for r, i, o, s in recorded]
    expected = replay(recorded)
    chunks = chunks_of(recorded, cuts)
    assert as_dict(latest(None, chunks)) == expected
    # Folded part way (a run ended), then the rest: the same answer.
    split = fold_at % (len(chunks) + 1)
    folded = latest(None, chunks[:split])
    assert as_dict(latest(folded, chunks[split:])) == expected
