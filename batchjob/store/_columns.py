"""Column chunks: how a run's plan, rows and identities are kept (Arrow IPC streams), and how
the latest outcome of each identity is worked out from them.

A chunk is written once and never changed, so appending a block of outcomes costs one insert
however many rows it holds, and a B-tree is never updated at a million random places (which
cost SQLite 6 to 50 s per million identities; docs/store.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchjob._errors import StoreError
from batchjob.store._base import SUCCESS_OF, Chunk

PLAN = "plan"  # position, event_id, order_ticket_key, file, source_row
PLAN_IDS = "plan_ids"  # identity, position: only when identities are not just event and key
ROWS = "rows"  # position, outcome, http_status, error, attempts, finished_at
IDS = "ids"  # identity, position, outcome, pending, sent, finished_at

PLAN_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("event_id", pa.string()),
        ("order_ticket_key", pa.string()),
        ("file", pa.int32()),
        ("source_row", pa.int64()),
    ]
)
PLAN_IDS_SCHEMA = pa.schema([("identity", pa.string()), ("position", pa.int64())])
ROWS_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("outcome", pa.string()),
        ("http_status", pa.int32()),
        ("error", pa.int32()),
        ("attempts", pa.int32()),
        ("finished_at", pa.float64()),
    ]
)
IDS_SCHEMA = pa.schema(
    [
        ("identity", pa.string()),
        ("position", pa.int64()),
        ("outcome", pa.string()),
        ("pending", pa.string()),
        ("sent", pa.bool_()),
        ("finished_at", pa.float64()),
    ]
)
#: A folded view: the latest entry of each identity, the run (seq) that decided it, and the
#: outcome of its last entry that was sent (null: none), which the rule below needs.
FOLD_SCHEMA = IDS_SCHEMA.append(pa.field("run", pa.int64())).append(
    pa.field("last_sent", pa.string())
)

#: Chunks hold keys (random text): lz4 is fast and still saves the repeated outcomes.
_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_OPTIONS) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


#: The most a chunk may hold once read (a block of a million rows is under 100 MiB): a chunk
#: crafted to inflate without bound is refused, not read.
MAX_CHUNK_BYTES = 1 << 30


def decode(data: bytes, schema: pa.Schema) -> pa.Table:
    """A chunk as a table of ``schema``; a chunk that is not one is a StoreError, found
    before it is inflated (its columns) or while (its size)."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        if not reader.schema.equals(schema):
            raise StoreError("a stored chunk has other columns than this batchjob writes")
        batches, size = [], 0
        for batch in reader:
            size += batch.nbytes
            if size > MAX_CHUNK_BYTES:
                raise StoreError("a stored chunk is larger than any batchjob writes")
            batches.append(batch)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"a stored chunk cannot be read: {exc}") from None
    return pa.Table.from_batches(batches, schema=schema)


def concat(tables: Sequence[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).combine_chunks()


def latest(base: pa.Table | None, chunks: Sequence[Chunk]) -> pa.Table:
    """Each identity's latest entry (FOLD_SCHEMA): later runs win, then later chunks; an
    entry that was never sent does not replace its own action's success (a stopped
    ``--again`` undo run must not make done work look pending)."""
    parts = [base] if base is not None and base.num_rows else []
    for chunk in chunks:
        table = decode(chunk.data, IDS_SCHEMA)
        table = table.append_column("run", pa.array(np.full(table.num_rows, chunk.seq)))
        sent_outcome = pc.if_else(table["sent"], table["outcome"], pa.scalar(None, pa.string()))
        parts.append(table.append_column("last_sent", sent_outcome))
    if not parts:
        return FOLD_SCHEMA.empty_table()
    if len(parts) == 1 and not chunks:
        return parts[0]
    entries = concat(parts, FOLD_SCHEMA)
    # Later runs win; chunks arrive per run in order, and a fold holds older runs. Stable.
    runs = entries["run"].to_numpy()
    if len(runs) > 1 and (np.diff(runs) < 0).any():  # else already in order: no copy
        entries = entries.take(pc.sort_indices(entries, [("run", "ascending")]))
    if not pc.all(entries["sent"]).as_py():
        return _latest_with_unsent(entries.to_pandas())
    # The last entry of each identity, in Arrow: no Python object per key (a million keys
    # in pandas cost 600 MiB more at the end of a run).
    numbered = entries.append_column("entry", pa.array(np.arange(entries.num_rows)))
    last = numbered.group_by("identity", use_threads=False).aggregate([("entry", "max")])
    if last.num_rows == entries.num_rows:
        return entries  # every identity once: nothing to drop, no copy
    keep = np.sort(last["entry_max"].to_numpy())
    return entries.take(pa.array(keep))


def _latest_with_unsent(frame: pd.DataFrame) -> pa.Table:
    """Drop an unsent entry when the last sent entry before it (same identity, a fold's
    history included) is the success of the entry's own action: a stopped ``--again`` undo
    run does not make an undone key pending, while a stopped check-in run does leave its keys
    pending for check-in. Then the last entry of each identity, knowing its last sent one."""
    identity = frame["identity"]
    so_far = frame["last_sent"].astype(object).groupby(identity).ffill()
    before = so_far.groupby(identity).shift(1)  # up to the entry before
    wanted = frame["pending"].map(SUCCESS_OF)
    sent = frame["sent"].to_numpy()
    keep = sent | (before.to_numpy() != wanted.to_numpy())
    final_sent = so_far.groupby(identity).last()  # unsent entries change nothing
    kept = frame[keep].drop_duplicates("identity", keep="last").copy()
    kept["last_sent"] = kept["identity"].map(final_sent)
    return pa.Table.from_pandas(kept, schema=FOLD_SCHEMA, preserve_index=False)
