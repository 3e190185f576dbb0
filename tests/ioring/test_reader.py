"""The chunk-table mirror: the vectorised choice of current entries agrees with
the per-chunk definition (`ChunkTable.candidates`, docs/FORMAT.md "Recovery")."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ringtail.ioring.format import CHUNK_ENTRY_SIZE_BYTES, CHUNK_RECORD_COUNT, ChunkEntry, Layout
from ringtail.ioring.reader import NO_COPY, ChunkTable

CAPACITY = 8 * CHUNK_RECORD_COUNT
LAYOUT = Layout(CAPACITY)
CHUNK_COUNT = LAYOUT.chunk_count


def _entry(chunk: int, shift: int, record_count: int) -> bytes:
    """An entry at `chunk`'s position naming chunk + shift x CHUNK_COUNT (0: this
    chunk; others: stale, from another wrap), or an all-zero entry when shift is None."""
    if shift is None:
        return bytes(CHUNK_ENTRY_SIZE_BYTES)
    named = max(0, chunk + shift * CHUNK_COUNT)
    return ChunkEntry(named * CHUNK_RECORD_COUNT, record_count,
                      bytes(range(16))).encode()


entry_specs = st.tuples(st.sampled_from([None, 0, 0, 0, -1, 1]),
                        st.integers(min_value=0, max_value=CHUNK_RECORD_COUNT + 2))


@settings(max_examples=300, deadline=None)
@given(base_chunk=st.integers(min_value=0, max_value=3 * CHUNK_COUNT),
       specs=st.lists(st.tuples(entry_specs, entry_specs), min_size=CHUNK_COUNT,
                      max_size=CHUNK_COUNT),
       chunk_span=st.integers(min_value=0, max_value=CHUNK_COUNT),
       next_in_last=st.integers(min_value=1, max_value=CHUNK_RECORD_COUNT))
def test_choose_first_candidates_agrees_with_candidates(base_chunk, specs, chunk_span,
                                                        next_in_last):
    chunk_first, chunk_end = base_chunk, base_chunk + chunk_span
    next_sequence = max(1, (chunk_end - 1) * CHUNK_RECORD_COUNT + next_in_last)
    tables = [bytearray(), bytearray()]
    for position in range(CHUNK_COUNT):
        # The chunk at this position within the range (or near it).
        chunk = chunk_first + (position - chunk_first) % CHUNK_COUNT
        for copy in (0, 1):
            shift, record_count = specs[position][copy]
            tables[copy] += _entry(chunk, shift, record_count)
    for table in tables:
        table += bytes(LAYOUT.table_size_bytes - len(table))
    table = ChunkTable(LAYOUT, bytes(tables[0]), bytes(tables[1]))
    table.current[:] = bytes([7]) * CHUNK_COUNT  # any stale value is overwritten
    expected = bytearray(table.current)
    for chunk in range(chunk_first, chunk_end):
        count_max = min(CHUNK_RECORD_COUNT, next_sequence - chunk * CHUNK_RECORD_COUNT)
        candidates = table.candidates(chunk, count_max)
        expected[chunk % CHUNK_COUNT] = candidates[0][0] if candidates else NO_COPY
    table.choose_first_candidates(chunk_first, chunk_end, next_sequence)
    assert table.current == expected


def test_a_tie_goes_to_table_a_and_the_longer_entry_wins():
    tables = [bytearray(LAYOUT.table_size_bytes), bytearray(LAYOUT.table_size_bytes)]
    for chunk, counts in {0: (64, 64), 1: (10, 20), 2: (30, 0), 3: (0, 5), 4: (65, 3)}.items():
        for copy, count in enumerate(counts):
            start = chunk * CHUNK_ENTRY_SIZE_BYTES
            tables[copy][start:start + CHUNK_ENTRY_SIZE_BYTES] = _entry(chunk, 0, count)
    table = ChunkTable(LAYOUT, bytes(tables[0]), bytes(tables[1]))
    table.choose_first_candidates(0, 6, 6 * CHUNK_RECORD_COUNT)
    assert list(table.current[:6]) == [0, 1, 0, 1, 1, NO_COPY]
