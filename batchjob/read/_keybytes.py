"""Keys as numbers, read straight from an Arrow string array's buffers.

Python-level string work on a million keys costs far more than reading their bytes with numpy.
:class:`KeyBytes` sees a one-chunk Arrow (large_)string array as its UTF-8 bytes and where each
key starts and ends, and gives each key an exact fixed-width encoding: its byte length plus a few
little-endian 8-byte words. Two keys are equal exactly when their lengths and words are.

In a fresh process every new array costs page faults on top of its pass, so the common path
allocates as few full-length arrays as it can.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Bytes = npt.NDArray[np.uint8]
Offsets = npt.NDArray[np.int64]
Words = npt.NDArray[np.uint64]
Rows = npt.NDArray[np.intp]  # indices into the key array

WORD: Final = 8
_MASKS: Final = np.array([(1 << (8 * n)) - 1 for n in range(WORD + 1)], dtype=np.uint64)
_MIN_DATA: Final = 2 * WORD
_SPACE: Final = 0x20
_DELETE: Final = 0x7F


class KeyBytes:
    """Key ``i`` is ``data[starts[i]:ends[i]]``."""

    def __init__(self, data: Bytes, starts: Offsets, ends: Offsets) -> None:
        self.data = data
        self.starts = starts
        self.ends = ends
        # Reads of a short key's word may wrap to the buffer's end (see :meth:`words`).
        self._readable = (
            data
            if len(data) >= _MIN_DATA
            else np.concatenate([data, np.zeros(_MIN_DATA, np.uint8)])
        )

    @functools.cached_property
    def lengths(self) -> Offsets:
        return self.ends - self.starts

    @classmethod
    def of(cls, array: Any) -> KeyBytes | None:
        """A one-chunk Arrow string array's keys; None if it has nulls or is another type."""
        kind = str(array.type)
        if kind not in ("string", "large_string") or array.null_count:
            return None
        width = np.int64 if kind == "large_string" else np.int32
        raw = np.frombuffer(array.buffers()[1], dtype=width)
        offsets = raw[array.offset : array.offset + len(array) + 1].astype(np.int64, copy=False)
        buffer = array.buffers()[2]
        data = np.zeros(0, np.uint8) if buffer is None else np.frombuffer(buffer, dtype=np.uint8)
        return cls(data, offsets[:-1], offsets[1:])

    @classmethod
    def of_series(cls, values: Any) -> KeyBytes | None:
        """A pandas string Series' keys, when Arrow holds them in one chunk; else None."""
        chunked = getattr(values.array, "_pa_array", None)
        if chunked is None or chunked.num_chunks != 1:
            return None
        return cls.of(chunked.chunk(0))

    def __len__(self) -> int:
        return len(self.starts)

    def slice(self, start: int, end: int) -> KeyBytes:
        return KeyBytes(self.data, self.starts[start:end], self.ends[start:end])

    def take(self, rows: Rows) -> KeyBytes:
        return KeyBytes(self.data, self.starts[rows], self.ends[rows])

    @property
    def longest(self) -> int:
        return int(self.lengths.max()) if len(self) else 0

    def empty(self) -> npt.NDArray[np.bool_]:
        found: npt.NDArray[np.bool_] = self.starts == self.ends
        return found

    @functools.cached_property
    def byte_range(self) -> tuple[int, int]:
        """The smallest and largest byte of all keys; (0x20, 0x20) when there are none."""
        if not len(self.data):
            return _SPACE, _SPACE
        return int(self.data.min()), int(self.data.max())

    @property
    def printable_ascii(self) -> bool:
        """Whether every byte is printable ASCII or a space: no control, no multi-byte char."""
        low, high = self.byte_range
        return low >= _SPACE and high < _DELETE

    def starts_with(self, byte: int) -> npt.NDArray[np.bool_]:
        """Which keys start with ``byte`` (an ASCII byte)."""
        if not len(self.data):
            return np.zeros(len(self), dtype=np.bool_)
        first = self.data[np.minimum(self.starts, len(self.data) - 1)]
        found: npt.NDArray[np.bool_] = (first == byte) & (self.starts < self.ends)
        return found

    def with_control(self) -> npt.NDArray[np.bool_]:
        """Which keys hold a control character (Unicode Cc: C0, DEL or C1)."""
        found = np.zeros(len(self), dtype=np.bool_)
        if self.printable_ascii:
            return found
        data = self.data
        flagged = (data < _SPACE) | (data == _DELETE)
        # C1 controls U+0080-U+009F are 0xC2 0x80-0x9F in UTF-8; flag the lead byte.
        flagged[:-1] |= (data[:-1] == 0xC2) & (data[1:] >= 0x80) & (data[1:] <= 0x9F)
        positions = np.flatnonzero(flagged)
        if not len(positions):
            return found
        # Offsets only grow, so the last key starting at or before a byte is the one that may
        # hold it (bytes outside every key belong to none).
        rows = np.searchsorted(self.starts, positions, side="right") - 1
        inside = rows >= 0
        rows, positions = rows[inside], positions[inside]
        found[rows[positions < self.ends[rows]]] = True
        return found

    def char_lengths(self, rows: Rows) -> Offsets:
        """The length in characters (UTF-8 lead bytes) of the keys at ``rows``."""
        if self.byte_range[1] < 0x80:
            return self.lengths[rows]
        lead = np.zeros(len(self.data) + 1, dtype=np.int64)
        np.cumsum((self.data & 0xC0) != 0x80, out=lead[1:])
        found: Offsets = lead[self.ends[rows]] - lead[self.starts[rows]]
        return found

    def may_need_strip(self) -> bool:
        """Whether any key may start or end with whitespace, so that stripping could change it.

        Any byte that is not printable ASCII counts as possible whitespace (Unicode spaces are
        multi-byte), so False is certain and True means the keys must be stripped to find out.
        Usually no byte in the whole buffer is one: two reductions, no per-key work.
        """
        low, high = self.byte_range
        if not len(self.data) or (low > _SPACE and high < _DELETE):
            return False
        starts, ends = self.starts, self.ends
        filled = starts < ends
        if not filled.all():
            starts, ends = starts[filled], ends[filled]
        if not len(starts):
            return False
        return bool(
            _unprintable(self.data[starts]).any() or _unprintable(self.data[ends - 1]).any()
        )

    def words(self, count: int) -> Iterator[Words]:
        """``count`` words per key; with its length, exact for keys up to ``8 * count`` bytes.

        Word ``j`` is the 8 bytes at ``min(8 * j, length - 8)``: for a key of at least 8 bytes
        every window lies inside the key and together they cover it, so no masking is needed.
        A shorter key is one window masked to its length, repeated in every word. The words come
        one at a time so that a caller folding them into a hash holds only one.
        """
        windows = _windows(self._readable)
        limit = len(windows) - 1
        short = np.flatnonzero(self.lengths < WORD)
        short_word = self.take(short)._short_word() if len(short) else None
        for j in range(count):
            # Short keys read garbage here (a negative index wraps to the buffer's end, starts
            # are clamped into it) and are overwritten below.
            if j == count - 1:
                at = self.ends - WORD
            elif j == 0:
                at = self.starts
                # Only a short key can start within the buffer's last 7 bytes.
                if len(short) and int(at.max()) > limit:
                    at = np.minimum(at, limit)
            else:
                at = np.minimum(self.starts + WORD * j, self.ends - WORD)
            word = windows[at]
            if short_word is not None:
                word[short] = short_word
            yield word

    def _short_word(self) -> Words:
        """The one word of keys under 8 bytes, read safely even at the end of the buffer."""
        limit = len(self._readable) - WORD
        at = np.minimum(self.starts, limit)
        shift = ((self.starts - at) * 8).astype(np.uint64)
        return (_windows(self._readable)[at] >> shift) & _MASKS[self.lengths]


def word_count(longest: int) -> int:
    return max(1, -(-longest // WORD))


def _unprintable(edge: Bytes) -> npt.NDArray[np.bool_]:
    return (edge <= _SPACE) | (edge >= _DELETE)


def _windows(data: Bytes) -> Words:
    """Every 8-byte window of ``data`` as a little-endian uint64: an overlapping view, no copy."""
    view: Words = np.ndarray(shape=(len(data) - WORD + 1,), dtype="<u8", buffer=data, strides=(1,))
    view.flags.writeable = False
    return view
