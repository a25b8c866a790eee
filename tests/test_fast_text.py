"""The hand-rolled text paths that keep thousands of requests a second cheap.

Each one has a slow, obviously right counterpart (csv.writer, json.dumps, pyarrow take); these
properties hold them to it byte for byte, for any text a spreadsheet export might hold.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from batchjob._cells import escape_cell
from batchjob.plan import Plan
from batchjob.record._rows import _csv_field, _format_times, _key_cells
from batchjob.send._messages import undo_body

# Text a cell can hold, with the characters that need care spelt out so they are tried often.
cell_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(",\"'\r\n\t=+-@\\ ;")),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    max_size=12,
)
plain_key = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=20)


def csv_row(values: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


@given(st.lists(st.one_of(plain_key, cell_text), min_size=1, max_size=12))
def test_report_key_cells_are_what_csv_writer_writes(keys: list[str]) -> None:
    # Two columns per key so that even a single empty key is a row csv.writer writes plainly.
    expected = csv_row([v for k in keys for v in (escape_cell(k), "x")])
    got = ",".join(f"{cell},x" for cell in _key_cells(keys)) + "\r\n"
    assert got == expected


@given(cell_text)
def test_one_csv_field_is_what_csv_writer_writes(value: str) -> None:
    assert _csv_field(value) + ",x\r\n" == csv_row([value, "x"])


def test_formula_keys_are_escaped_even_in_a_clean_looking_block() -> None:
    assert _key_cells(["abc", "=1+2", "def"]) == ["abc", "'=1+2", "def"]
    assert _key_cells(["abc", "x,y"]) == ["abc", '"x,y"']


@given(st.lists(plain_key, min_size=1, max_size=20))
def test_undo_body_is_json_dumps_byte_for_byte(keys: list[str]) -> None:
    assert (
        undo_body(keys) == json.dumps({"order_ticket_keys": keys}, separators=(",", ":")).encode()
    )


@given(st.lists(st.one_of(plain_key, cell_text), min_size=1, max_size=12))
def test_undo_body_carries_any_key_unchanged(keys: list[str]) -> None:
    assert json.loads(undo_body(keys)) == {"order_ticket_keys": keys}


def test_a_key_holding_the_separator_is_not_split() -> None:
    assert json.loads(undo_body(['a","b', "c"])) == {"order_ticket_keys": ['a","b', "c"]}


@given(
    st.lists(st.one_of(plain_key, cell_text), min_size=1, max_size=30),
    st.data(),
    st.booleans(),
    st.integers(0, 3),
)
def test_plan_keys_at_matches_arrow_take(
    keys: list[str], data: st.DataObject, large: bool, skip: int
) -> None:
    array = pa.array(keys, type=pa.large_string() if large else pa.string())
    array = array.slice(min(skip, len(keys) - 1))  # a sliced array has a non-zero offset
    positions = np.asarray(
        data.draw(st.lists(st.integers(0, len(array) - 1), min_size=1, max_size=10)),
        dtype=np.int64,
    )
    plan = Plan(rows=pd.DataFrame(), events={}, duplicates=0, blank_rows=0, keys=array)
    assert plan.keys_at(positions) == array.take(pa.array(positions)).to_pylist()


@given(
    st.lists(
        st.one_of(st.floats(0, 4_000_000_000, allow_nan=False), st.just(float("nan"))),
        min_size=1,
        max_size=40,
    )
)
def test_report_times_are_utc_seconds_or_empty(seconds: list[float]) -> None:
    expected = [
        ""
        if math.isnan(s)
        else datetime.datetime.fromtimestamp(math.floor(s), datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        for s in seconds
    ]
    assert _format_times(np.asarray(seconds, dtype=np.float64)) == expected
