"""Planning: from input rows to unique (event, key) pairs grouped by event.

The plan's ``rows`` are exactly the report's rows, in input order: each unique (event, key)
once, plus every unusable row. Positions into ``rows`` are what the later stages pass around,
so a key is a number in a numpy array, not a Python object.

Finding repeats is most of the work. Hashing a million strings through pandas costs several
times as much as reading the file, so keys are instead hashed with numpy straight from their
UTF-8 bytes (see :mod:`._keybytes`) and every repeat the hash finds is checked byte for byte
against its first occurrence. Only keys too long to hash that way, or a hash collision, take the
slower exact path; both paths give the same plan.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from batchjob.read import HIDDEN_PROBLEM, Inputs, KeyBytes, Offsets, ReadSummary, Words, word_count

#: Rows of the plan (indices into ``Plan.rows``): what the later stages pass around.
Positions = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]
Codes = npt.NDArray[np.integer[Any]]
Hashes = npt.NDArray[np.uint64]

# Longer keys take the exact path: real ticket keys are a dozen characters or so, and the
# per-row cost of hashing grows with every 8 bytes.
LONGEST_HASHED_KEY: Final = 64
# Repeats are looked for one run of whole events at a time: a hash table for this many rows
# stays in the CPU cache, one for a million does not (about three times as slow).
_BATCH_ROWS: Final = 1 << 15
# Rows hashed at a time: each block's few arrays stay in the CPU cache through ~20 passes.
_HASH_BLOCK: Final = 1 << 15
_WORKERS: Final = max(1, min(os.cpu_count() or 1, 4))
# splitmix64 (Steele, Lea, Flood 2014): a multiplier spreading the tag, then the finaliser's.
_MIXERS: Final = tuple(
    np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)
_SHIFTS: Final = tuple(np.uint64(s) for s in (30, 27, 31))


@dataclass(frozen=True)
class Plan:
    rows: pd.DataFrame  # event_id, order_ticket_key, source_file, source_row, problem
    events: dict[str, Positions]  # usable rows by event, events and keys in input order
    duplicates: int  # input rows dropped as repeats of an earlier (event, key)
    blank_rows: int
    keys: Any  # pyarrow StringArray of rows' keys, one chunk: take() by position is cheap
    seen: ReadSummary = field(default_factory=ReadSummary)

    @property
    def invalid(self) -> Positions:
        problem = self.rows["problem"]
        return np.flatnonzero(((problem != "") & (problem != HIDDEN_PROBLEM)).to_numpy()).astype(
            np.int64
        )

    @property
    def skipped(self) -> Positions:
        """Rows hidden in a spreadsheet: not sent on purpose."""
        return np.flatnonzero((self.rows["problem"] == HIDDEN_PROBLEM).to_numpy()).astype(np.int64)

    @property
    def key_count(self) -> int:
        return sum(len(p) for p in self.events.values())

    def keys_at(self, positions: Positions) -> list[str]:
        """The keys at ``positions``, as str: a request's worth, once per request."""
        return self._texts(positions)

    @functools.cached_property
    def _texts(self) -> Callable[[Positions], list[str]]:
        found = KeyBytes.of(self.keys)
        if found is None:
            return lambda positions: self.keys.take(pa.array(positions)).to_pylist()
        # Arrow's take() spends ~30 us in dispatch for ten keys; slicing one bytes object (the
        # keys' UTF-8, one copy, no Python object per key) takes a few.
        blob, starts, ends = found.data.tobytes(), found.starts, found.ends

        def texts(positions: Positions) -> list[str]:
            return [
                blob[s:e].decode()
                for s, e in zip(starts[positions].tolist(), ends[positions].tolist(), strict=True)
            ]

        return texts


def _key_array(keys: pd.Series[Any]) -> Any:
    """The keys as one contiguous Arrow array (a chunked one makes every take() slow)."""
    array = pa.array(keys.array) if not hasattr(keys.array, "_pa_array") else keys.array._pa_array
    if isinstance(array, pa.ChunkedArray):
        # combine_chunks copies even a single chunk.
        return array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    return array


def build_plan(inputs: Inputs) -> Plan:
    frame, hidden_repeats = _drop_hidden_repeats(inputs.frame)
    codes: Codes = frame["event_id"].cat.codes.to_numpy()
    names = frame["event_id"].cat.categories
    usable = _usable(frame["problem"])
    keys = _key_array(frame["order_ticket_key"])
    key_bytes = _hashable(keys)
    repeated = None
    # numpy and pandas release the GIL in the loops used here, so threads use every core.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        grouping = pool.submit(_group_order, codes, len(names))
        if key_bytes is not None:
            hashes = _hashes(pool, key_bytes, codes, usable)
            order, sizes = grouping.result()
            repeated = _hashed_repeats(pool, hashes, order, sizes, key_bytes, codes, usable)
        order, sizes = grouping.result()
    if repeated is None:
        repeated = _exact_repeats(frame["order_ticket_key"], codes, usable)
    keep = usable
    rows = frame
    if len(repeated):
        dropped = np.zeros(len(frame), dtype=np.bool_)
        dropped[repeated] = True
        keep = ~dropped if keep is None else keep & ~dropped
        rows = frame.loc[~dropped].reset_index(drop=True)
        keys = _key_array(rows["order_ticket_key"])
    return Plan(
        rows=rows,
        events=_events(codes, order, sizes, keep, repeated, [str(name) for name in names]),
        duplicates=len(repeated) + hidden_repeats,
        blank_rows=inputs.blank_rows,
        keys=keys,
        seen=inputs.seen,
    )


def _drop_hidden_repeats(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Hidden rows whose (event, key) is also on a usable row: that row counts, this one merges
    into it as a duplicate."""
    problem = frame["problem"]
    if HIDDEN_PROBLEM not in problem.cat.categories:
        return frame, 0
    hidden = (problem == HIDDEN_PROBLEM).to_numpy()
    usable = (problem == "").to_numpy()
    if not usable.any():
        return frame, 0
    pairs = pd.MultiIndex.from_arrays(
        [frame["event_id"].cat.codes.to_numpy(), frame["order_ticket_key"].to_numpy()]
    )
    repeat = hidden & pairs.isin(pairs[usable])
    if not repeat.any():
        return frame, 0
    return frame.loc[~repeat].reset_index(drop=True), int(repeat.sum())


def _group_order(codes: Codes, categories: int) -> tuple[Positions, npt.NDArray[np.intp]]:
    """Row numbers grouped by event, each event's in input order; and each event's row count."""
    # Category codes are int8/int16, for which numpy's stable sort is a radix sort.
    return np.argsort(codes, kind="stable"), np.bincount(codes, minlength=categories)


def _usable(problem: pd.Series[Any]) -> Mask | None:
    """Which rows have no problem; None when all of them (the usual case, and no pass)."""
    categories = list(problem.cat.categories)
    if categories == [""]:
        return None
    if "" not in categories:
        return np.zeros(len(problem), dtype=np.bool_)
    found: Mask = problem.cat.codes.to_numpy() == categories.index("")
    return found


def _events(
    codes: Codes,
    order: Positions,
    sizes: npt.NDArray[np.intp],
    keep: Mask | None,
    repeated: Positions,
    names: list[str],
) -> dict[str, Positions]:
    """Kept rows by event, as positions into the rows that remain once repeats are dropped."""
    chosen = order
    if keep is not None:
        chosen = order[keep[order]]
        sizes = np.bincount(codes[chosen], minlength=len(names))
    if len(repeated):
        chosen = chosen - np.searchsorted(repeated, chosen)
    groups = np.split(chosen.astype(np.int64, copy=False), np.cumsum(sizes)[:-1])
    found = [(code, group) for code, group in enumerate(groups) if len(group)]
    # Events in the order they first appear; within one, keys in input order (stable sort).
    found.sort(key=lambda item: int(item[1][0]))
    return {names[code]: group for code, group in found}


def _exact_repeats(keys: pd.Series[Any], codes: Codes, usable: Mask | None) -> Positions:
    """Rows repeating an earlier row's (event, usable, key), by hashing the strings themselves."""
    has_key = (keys != "").to_numpy(dtype=bool)
    # One int64 per (usable, event, key): hashing 1M of them is far cheaper than hashing
    # string pairs.
    usable_bit = (np.ones(len(keys), dtype=np.int64) if usable is None else usable).astype(np.int64)
    key_codes, _ = pd.factorize(keys)
    pairs = (codes.astype(np.int64) << 33) | (usable_bit << 32) | key_codes.astype(np.int64)
    repeat = pd.Series(pairs).duplicated(keep="first").to_numpy() & has_key
    return np.flatnonzero(repeat).astype(np.int64)


def _hashable(keys: Any) -> KeyBytes | None:
    found = KeyBytes.of(keys)
    if found is None or found.longest > LONGEST_HASHED_KEY:
        return None
    return found


def _hashes(pool: Executor, keys: KeyBytes, codes: Codes, usable: Mask | None) -> Hashes:
    """:func:`row_hash` of every row.

    Block by block, so the ~20 passes over each block's few arrays run in the CPU cache rather
    than memory, and blocks of that size reuse freed memory instead of faulting in new pages.
    Each block is a task, so workers that are also sorting get fewer.
    """
    count = word_count(keys.longest)
    hashes = np.empty(len(keys), dtype=np.uint64)

    def block(start: int) -> None:
        rows = slice(start, start + _HASH_BLOCK)
        lengths, part = keys.lengths[rows], keys.slice(start, start + _HASH_BLOCK)
        tags = _tags(codes[rows], None if usable is None else usable[rows], lengths)
        hashes[rows] = row_hash(tags, part.words(count))

    for done in [pool.submit(block, start) for start in range(0, len(keys), _HASH_BLOCK)]:
        done.result()
    return hashes


def _hashed_repeats(
    pool: Executor,
    hashes: Hashes,
    order: Positions,
    sizes: npt.NDArray[np.intp],
    keys: KeyBytes,
    codes: Codes,
    usable: Mask | None,
) -> Positions | None:
    """As :func:`_exact_repeats`, or None when two different rows' hashes collide."""
    bounds = _batches(sizes)
    flagged = _flag_repeats(pool, hashes, order, bounds)
    if not flagged.any():
        return np.zeros(0, dtype=np.int64)
    later = np.flatnonzero(flagged)
    first = _first_occurrences(hashes, order, bounds, flagged)[later]
    later, first = order[later], order[first]
    count = word_count(keys.longest)

    def encoded(rows: Positions) -> Iterable[npt.NDArray[Any]]:
        yield codes[rows]
        if usable is not None:
            yield usable[rows]
        chosen = keys.take(rows)
        yield chosen.lengths
        yield from chosen.words(count)

    if not all(np.array_equal(a, b) for a, b in zip(encoded(later), encoded(first), strict=True)):
        return None
    # Rows without a key are each reported on their own (they are not the same ticket).
    return np.sort(later[keys.lengths[later] > 0]).astype(np.int64)


def _tags(codes: Codes, usable: Mask | None, lengths: Offsets) -> Hashes:
    """Byte length, usable bit and event code in one uint64 per row, without collisions.

    Lengths are at most 64, so 7 bits.
    """
    tags = codes.astype(np.uint64)
    tags <<= np.uint64(8)
    tags |= lengths.view(np.uint64)
    # Usable rows only repeat usable rows, so a malformed row never hides a good row for the
    # same key.
    np.bitwise_or(tags, np.uint64(1 << 7), out=tags, where=True if usable is None else usable)
    return tags


def row_hash(tags: Hashes, words: Iterable[Words]) -> Hashes:
    """A 64-bit hash of each row's tag and words, computed in place in ``tags``.

    Equal rows always hash equal; repeats it suggests are checked, so a collision costs time,
    never a wrong plan. Each word is xored in and then mixed with splitmix64's finaliser, a
    bijection with full avalanche: rows differing only in their last word never collide, and
    keys differing in a few nearby bytes (``...a1`` and ``...b0``) do not cancel out.
    """
    scratch = np.empty_like(tags)
    tags *= _MIXERS[0]
    for word in words:
        tags ^= word
        for shift, multiplier in zip(_SHIFTS, _MIXERS[1:], strict=False):
            tags ^= np.right_shift(tags, shift, out=scratch)
            tags *= multiplier
        tags ^= np.right_shift(tags, _SHIFTS[-1], out=scratch)
    return tags


def _batches(sizes: npt.NDArray[np.intp]) -> list[tuple[int, int]]:
    """Runs of whole events of about ``_BATCH_ROWS`` rows, as (start, end) in grouped order."""
    bounds: list[tuple[int, int]] = []
    start = end = 0
    for size in sizes.tolist():
        end += size
        if end - start >= _BATCH_ROWS:
            bounds.append((start, end))
            start = end
    if end > start:
        bounds.append((start, end))
    return bounds


def _flag_repeats(
    pool: Executor, hashes: Hashes, order: Positions, bounds: list[tuple[int, int]]
) -> Mask:
    """Rows, in grouped order, whose hash an earlier row of the same batch has."""
    flagged = np.zeros(len(hashes), dtype=np.bool_)

    def batch(start: int, end: int) -> None:
        found = pd.Series(hashes[order[start:end]], copy=False).duplicated()
        flagged[start:end] = found.to_numpy()

    for done in [pool.submit(batch, start, end) for start, end in bounds]:
        done.result()
    return flagged


def _first_occurrences(
    hashes: Hashes, order: Positions, bounds: list[tuple[int, int]], flagged: Mask
) -> Positions:
    """For each flagged row, the first row of its batch with the same hash (others: 0)."""
    first = np.zeros(len(hashes), dtype=np.int64)
    for start, end in bounds:
        repeats = flagged[start:end]
        if not repeats.any():
            continue
        codes, _ = pd.factorize(hashes[order[start:end]])
        # factorize numbers hashes as they first appear, so the k-th unflagged row is the first
        # occurrence of code k.
        firsts = np.flatnonzero(~repeats) + start
        first[start:end][repeats] = firsts[codes[repeats]]
    return first
