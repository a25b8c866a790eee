"""The latest outcome of each identity, worked out from column chunks: the same as replaying
every entry in order, however the entries were split into chunks and folds."""

from __future__ import annotations

import itertools

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjob.store._base import SUCCESS_OUTCOMES, Chunk
from batchjob.store._columns import IDS, IDS_SCHEMA, encode, latest

ACTION_OF_RUN = {1: "undo", 2: "check-in", 3: "undo", 4: "undo"}
SUCCESS = {"undo": "undone", "check-in": "checked_in"}
Entry = tuple[int, str, str, bool]

#: (run, identity, outcome, sent) in the order they were recorded; run 2 checks keys in.
entries = st.lists(
    st.tuples(
        st.integers(1, 4),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["success", "failed", "not_attempted"]),
        st.booleans(),
    ),
    max_size=40,
).map(
    lambda found: sorted(
        [
            (r, i, SUCCESS[ACTION_OF_RUN[r]] if o == "success" else o, s or o == "success")
            for r, i, o, s in found
        ],
        key=lambda e: e[0],  # runs record in start order
    )
)


def replay(recorded: list[Entry]) -> dict[str, tuple[str, int]]:
    """The rule, one entry at a time: an entry never sent does not replace its own action's
    success (it does replace the other action's: a stopped check-in leaves keys pending)."""
    state: dict[str, tuple[str, int]] = {}
    last_sent: dict[str, str] = {}
    for run, identity, outcome, sent in recorded:
        if sent:
            last_sent[identity] = outcome
        elif last_sent.get(identity) == SUCCESS[ACTION_OF_RUN[run]]:
            continue
        state[identity] = (outcome, run)
    return state


def chunks_of(recorded: list[Entry], cuts: list[int]) -> list[Chunk]:
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
                    "pending": [
                        "" if e[2] in SUCCESS_OUTCOMES else ACTION_OF_RUN[run] for e in mine
                    ],
                    "sent": [e[3] for e in mine],
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


@settings(max_examples=150, deadline=None)
@given(entries, st.lists(st.integers(0, 40), max_size=4), st.integers(0, 40))
def test_chunks_and_folds_agree_with_replaying_every_entry(
    recorded: list[Entry], cuts: list[int], fold_at: int
) -> None:
    expected = replay(recorded)
    chunks = chunks_of(recorded, cuts)
    assert as_dict(latest(None, chunks)) == expected
    # Folded part way (a run ended), then the rest: the same answer.
    split = fold_at % (len(chunks) + 1)
    folded = latest(None, chunks[:split])
    assert as_dict(latest(folded, chunks[split:])) == expected
