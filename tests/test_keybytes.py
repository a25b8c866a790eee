"""Keys read from Arrow's buffers: the fixed-width encoding is exact, the strip check is safe."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjob.read import KeyBytes, word_count

_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
# Few distinct characters, so that equal and nearly equal keys are common.
_near = st.text(alphabet="ab \u00a0é\t", max_size=20)


def _key_bytes(keys: list[str], large: bool, cut: int) -> tuple[KeyBytes, list[str]]:
    """The keys as a (large_)string array, maybe a slice of a longer one."""
    array = pa.array(["pad", *keys, "pad"], type=pa.large_string() if large else pa.string())
    found = KeyBytes.of(array.slice(cut, len(keys)) if cut else array)
    assert found is not None
    return found, keys if cut else ["pad", *keys, "pad"]


def _encodings(found: KeyBytes) -> list[tuple[int, ...]]:
    words = list(found.words(word_count(found.longest)))
    return [(int(found.lengths[i]), *(int(word[i]) for word in words)) for i in range(len(found))]


@settings(max_examples=200, deadline=None)
@given(st.lists(_texts | _near, max_size=12), st.booleans(), st.sampled_from([0, 1]))
def test_keys_encode_equal_exactly_when_they_are_equal(
    keys: list[str], large: bool, cut: int
) -> None:
    found, shown = _key_bytes(keys, large, cut)
    encoded = _encodings(found)
    for i, key in enumerate(shown):
        for j, other in enumerate(shown):
            assert (encoded[i] == encoded[j]) == (key == other)


@settings(max_examples=100, deadline=None)
@given(st.lists(_texts | _near, min_size=1, max_size=12), st.booleans(), st.sampled_from([0, 1]))
def test_a_subset_encodes_as_the_whole_does(keys: list[str], large: bool, cut: int) -> None:
    found, _ = _key_bytes(keys, large, cut)
    rows = pa.array(range(len(found) - 1, -1, -1)).to_numpy()  # reversed: not in buffer order
    whole = _encodings(found)
    words = list(found.take(rows).words(word_count(found.longest)))
    assert [tuple(int(word[i]) for word in words) for i in range(len(rows))] == [
        whole[row][1:] for row in rows
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(_texts | _near, max_size=12))
def test_keys_said_to_need_no_strip_need_none(keys: list[str]) -> None:
    found, shown = _key_bytes(keys, True, 0)
    if not found.may_need_strip():
        assert pc.utf8_trim_whitespace(pa.array(shown)).to_pylist() == shown


def test_clean_keys_need_no_strip_and_one_padded_key_does() -> None:
    clean = [f"{i:012x}" for i in range(1000)]
    assert not KeyBytes.of(pa.array(clean)).may_need_strip()  # type: ignore[union-attr]
    for padded in (" k", "k\t", "k\u00a0", "\u3000k"):
        found = KeyBytes.of(pa.array([*clean, padded, *clean]))
        assert found is not None and found.may_need_strip()
