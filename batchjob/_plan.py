"""Planning: from input rows to unique (event, key) pairs grouped by event.

The plan's ``rows`` are exactly the report's rows, in input order: each unique (event, key)
once, plus every unusable row. Positions into ``rows`` are what the later stages pass around,
so a key is a number in a numpy array, not a Python object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from batchjob._groups import Positions
from batchjob._inputs import Inputs


@dataclass(frozen=True)
class Plan:
    rows: pd.DataFrame  # event_id, order_ticket_key, source_file, source_row, problem
    events: dict[str, Positions]  # usable rows by event, events and keys in input order
    duplicates: int  # input rows dropped as repeats of an earlier (event, key)
    blank_rows: int
    keys: Any  # pyarrow StringArray of rows' keys, one chunk: take() by position is cheap

    @property
    def invalid(self) -> Positions:
        return np.flatnonzero((self.rows["problem"] != "").to_numpy()).astype(np.int64)

    @property
    def key_count(self) -> int:
        return sum(len(p) for p in self.events.values())

    def keys_at(self, positions: Positions) -> list[str]:
        return self.keys.take(pa.array(positions)).to_pylist()  # type: ignore[no-any-return]


def _key_array(keys: pd.Series[Any]) -> Any:
    """The keys as one contiguous Arrow array (a chunked one makes every take() slow)."""
    array = pa.array(keys.array) if not hasattr(keys.array, "_pa_array") else keys.array._pa_array
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def build_plan(inputs: Inputs) -> Plan:
    frame = inputs.frame
    keys = frame["order_ticket_key"]
    has_key = (keys != "").to_numpy(dtype=bool)
    # One int64 per (usable, event, key): hashing 1M of them is far cheaper than hashing
    # string pairs. Usable rows only repeat usable rows, so a malformed row never hides a
    # good row for the same key.
    small_codes = frame["event_id"].cat.codes.to_numpy()
    usable_bit = (frame["problem"] == "").to_numpy(dtype=bool).astype(np.int64)
    key_codes, _ = pd.factorize(keys)
    pairs = (small_codes.astype(np.int64) << 33) | (usable_bit << 32) | key_codes.astype(np.int64)
    # Rows without a key are each reported on their own (they are not the same ticket).
    repeat = pd.Series(pairs).duplicated(keep="first").to_numpy() & has_key
    if repeat.any():
        rows = frame.loc[~repeat].reset_index(drop=True)
        small_codes = small_codes[~repeat]
    else:
        rows = frame
    usable = (rows["problem"] == "").to_numpy(dtype=bool)
    positions = np.flatnonzero(usable).astype(np.int64)
    # Category codes are int8/int16, for which numpy's stable sort is a radix sort.
    codes = small_codes[positions]
    order = np.argsort(codes, kind="stable")
    groups = np.split(positions[order], np.flatnonzero(np.diff(codes[order])) + 1)
    names = rows["event_id"].cat.categories
    events: dict[str, Positions] = {}
    # Events in the order they first appear; within one, keys in input order (stable sort).
    for group in sorted((g for g in groups if len(g)), key=lambda g: int(g[0])):
        events[str(names[small_codes[group[0]]])] = group
    return Plan(
        rows=rows,
        events=events,
        duplicates=int(repeat.sum()),
        blank_rows=inputs.blank_rows,
        keys=_key_array(rows["order_ticket_key"]),
    )
