"""Planning: from input rows to unique (event, key) pairs grouped by event.

The plan's ``rows`` are exactly the report's rows, in input order: each unique (event, key)
once, plus every unusable row. Positions into ``rows`` are what the later stages pass around,
so a key is a number in a numpy array, not a Python object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from batchjob._groups import Positions
from batchjob._inputs import Inputs


@dataclass(frozen=True)
class Plan:
    rows: pd.DataFrame  # event_id, order_ticket_key, source_file, source_row, problem
    events: dict[str, Positions]  # usable rows by event, events and keys in input order
    duplicates: int  # input rows dropped as repeats of an earlier (event, key)
    blank_rows: int

    @property
    def invalid(self) -> Positions:
        return np.flatnonzero((self.rows["problem"] != "").to_numpy()).astype(np.int64)

    @property
    def key_count(self) -> int:
        return sum(len(p) for p in self.events.values())


def build_plan(inputs: Inputs) -> Plan:
    frame = inputs.frame
    has_key = (frame["order_ticket_key"] != "").to_numpy()
    # Rows without a key are each reported on their own (they are not the same ticket).
    repeat = frame.duplicated(["event_id", "order_ticket_key"], keep="first").to_numpy() & has_key
    rows = frame.loc[~repeat].reset_index(drop=True)
    usable = (rows["problem"] == "").to_numpy()
    events: dict[str, Positions] = {}
    if usable.any():
        positions = np.flatnonzero(usable).astype(np.int64)
        event_ids = rows["event_id"].to_numpy()[positions]
        codes, uniques = pd.factorize(event_ids, sort=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for group in np.split(positions[order], bounds):
            events[str(event_ids[np.searchsorted(positions, group[0])])] = group
        # factorize numbered events by first appearance; keep that order for the dict.
        events = {str(e): events[str(e)] for e in uniques}
    return Plan(
        rows=rows, events=events, duplicates=int(repeat.sum()), blank_rows=inputs.blank_rows
    )
