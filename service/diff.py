"""`ringtail diff A B`: the first epoch where two runs' observable streams diverge.

This module is the comparison engine; service/diff_command.py has the sources
and the command. docs/REPLAY.md is the user's contract; DESIGN.md
"Differential replay" the design's. Each side is a stream of records in arrival order (sequence order)
from one of four sources: `tenant:T` (through the daemon), a ring file (read
directly, O_RDONLY), a VRRL0001 file or a snapshot file.

How it compares, vectorised with numpy on the record dtype (no Python per
record):

- each side's stream is cut into epochs by `EpochGrouper`; an epoch is
  complete once the stream has reached epoch e + 1 + EPOCH_OVERLAP_COUNT, so
  at most EPOCH_OVERLAP_COUNT + 1 epochs per side are held at once;
- the two sides' epochs are merged in ascending order; inside an epoch a
  record's key is (slot_idx, n) where n counts earlier records of the same
  slot in arrival order; records with equal keys are matched;
- matched records are compared as sixteen u32 words, masked to the compared
  fields (all but timestamp_ns and tenant_id unless asked for);
- `strict_order` also compares the keys' arrival order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Callable, Iterable

import numpy
import trio
from ringtail.ioring.record import (
    RECORD_DTYPE,
    RECORD_SIZE_BYTES,
    SlotRecord,
    failure_class_name,
)

# Records of one epoch a side may hold: 2,097,152 x 64 B = 128 MiB per side;
# with EPOCH_OVERLAP_COUNT = 1 two epochs are open per side, so the diff's
# memory is at most 4 x 128 MiB = 512 MiB plus one source read. An epoch past
# it is an error naming the epoch (raise the limit with --epoch-record-max).
DIFF_EPOCH_RECORD_COUNT_MAX = 1 << 21
# Epochs older than the newest one seen that may still receive records: with
# several publishers, records of epoch e can arrive after the first of epoch
# e + 1. A record of an epoch older than that is an error (the stream is not
# epoch-ordered enough to diff in bounded memory).
EPOCH_OVERLAP_COUNT = 1
# Differing or one-sided slots listed per divergent epoch (the counts are
# always complete); keeps the report readable and its memory small.
DIFF_REPORT_SLOT_COUNT_MAX = 100
# The most --epoch-record-max can be raised to: 2**26 records = 4 GiB per epoch.
DIFF_EPOCH_RECORD_COUNT_LIMIT = 1 << 26
assert 1 <= DIFF_EPOCH_RECORD_COUNT_MAX <= DIFF_EPOCH_RECORD_COUNT_LIMIT
assert EPOCH_OVERLAP_COUNT >= 0

RECORD_WORD_COUNT = RECORD_SIZE_BYTES // 4
# Fields by name -> the u32 words they occupy (derived from the dtype, the spec).
FIELD_WORDS: dict[str, range] = {
    name: range(offset // 4, (offset + RECORD_DTYPE.fields[name][0].itemsize) // 4)
    for name, (_, offset) in ((n, RECORD_DTYPE.fields[n][:2]) for n in RECORD_DTYPE.names)
}
assert sum(len(words) for words in FIELD_WORDS.values()) == RECORD_WORD_COUNT
# slot_idx and epoch are the match keys, so they always agree on matched records.
KEY_FIELDS = ("epoch", "slot_idx")
IGNORED_BY_DEFAULT = ("timestamp_ns", "tenant_id")
COMPARABLE_FIELDS = tuple(name for name in RECORD_DTYPE.names if name not in KEY_FIELDS)


class DiffUsageError(ValueError):
    """A bad argument (source, field name, epoch range): exit status 2."""


class DiffSourceError(Exception):
    """A source cannot be diffed as it is (an epoch too large, epochs out of order, lost records)."""


# -- options --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DiffOptions:
    compared_fields: tuple[str, ...] = tuple(f for f in COMPARABLE_FIELDS
                                             if f not in IGNORED_BY_DEFAULT)
    strict_order: bool = False
    epoch_min: int = 0
    epoch_max: int = 0xFFFF_FFFF
    epoch_record_count_max: int = DIFF_EPOCH_RECORD_COUNT_MAX
    detail_slot_count_max: int = DIFF_REPORT_SLOT_COUNT_MAX

    @property
    def byte_mask(self) -> numpy.ndarray:
        """Eight u64 whose bytes are 0xFF where a compared field lies in the record."""
        return _byte_mask(self.compared_fields)


@functools.lru_cache(maxsize=16)
def _byte_mask(fields: tuple[str, ...]) -> numpy.ndarray:
    mask = bytearray(RECORD_SIZE_BYTES)
    for name in fields:
        for word in FIELD_WORDS[name]:
            mask[word * 4:word * 4 + 4] = b"\xff" * 4
    return numpy.frombuffer(bytes(mask), dtype=numpy.uint64)


def parse_field_list(text: str, option: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPARABLE_FIELDS]
    if unknown:
        raise DiffUsageError(f"{option} {text!r}: unknown or key field {', '.join(unknown)}; "
                             f"use a comma-separated list of {', '.join(COMPARABLE_FIELDS)}")
    return names


def parse_epoch_range(text: str, option: str = "--epochs") -> tuple[int, int]:
    """'X..Y' (inclusive), 'X..' or '..Y' or 'X' -> (min, max)."""
    low, separator, high = text.partition("..")
    try:
        epoch_min = int(low) if low.strip() else 0
        epoch_max = (int(high) if high.strip() else 0xFFFF_FFFF) if separator else epoch_min
    except ValueError:
        raise DiffUsageError(f"{option} {text!r}: use X..Y (inclusive epochs), X.. or ..Y") from None
    if not 0 <= epoch_min <= epoch_max <= 0xFFFF_FFFF:
        raise DiffUsageError(f"{option} {text!r}: epochs are u32 and X must not exceed Y")
    return epoch_min, epoch_max


def make_options(ignore: str = "", include: str = "", strict_order: bool = False,
                 epochs: str | None = None,
                 epoch_record_count_max: int = DIFF_EPOCH_RECORD_COUNT_MAX) -> DiffOptions:
    ignored = set(IGNORED_BY_DEFAULT) - set(parse_field_list(include, "--include"))
    ignored |= set(parse_field_list(ignore, "--ignore"))
    fields = tuple(f for f in COMPARABLE_FIELDS if f not in ignored)
    epoch_min, epoch_max = parse_epoch_range(epochs) if epochs else (0, 0xFFFF_FFFF)
    if not 1 <= epoch_record_count_max <= DIFF_EPOCH_RECORD_COUNT_LIMIT:
        raise DiffUsageError(f"--epoch-record-max {epoch_record_count_max} is outside "
                             f"1..{DIFF_EPOCH_RECORD_COUNT_LIMIT}")
    return DiffOptions(fields, strict_order, epoch_min, epoch_max, epoch_record_count_max)


# -- results ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SlotDiff:
    slot_idx: int
    occurrence: int  # 0 for the slot's first record in the epoch, 1 for its repeat...
    kind: str  # "fields", "only_a" or "only_b"
    fields: tuple[tuple[str, object, object], ...] = ()  # (name, A's value, B's value)

    def to_json_dict(self) -> dict:
        result: dict = {"slot_idx": self.slot_idx, "occurrence": self.occurrence,
                        "kind": self.kind}
        if self.fields:
            result["fields"] = [{"field": name, "a": a, "b": b} for name, a, b in self.fields]
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class EpochDiff:
    epoch: int
    a_record_count: int
    b_record_count: int
    differing_count: int
    only_a_count: int
    only_b_count: int
    slots: tuple[SlotDiff, ...]  # at most detail_slot_count_max, slot order
    order_mismatch: tuple[int, int, int] | None = None  # (position, A's slot, B's slot)

    @property
    def divergent(self) -> bool:
        return bool(self.differing_count or self.only_a_count or self.only_b_count
                    or self.order_mismatch)

    def to_json_dict(self) -> dict:
        result = {"epoch": self.epoch, "a_records": self.a_record_count,
                  "b_records": self.b_record_count, "differing_slots": self.differing_count,
                  "only_in_a": self.only_a_count, "only_in_b": self.only_b_count,
                  "slots": [slot.to_json_dict() for slot in self.slots]}
        if self.order_mismatch:
            position, a_slot, b_slot = self.order_mismatch
            result["order_mismatch"] = {"position": position, "a_slot_idx": a_slot,
                                        "b_slot_idx": b_slot}
        return result


@dataclasses.dataclass(slots=True)
class DiffSummary:
    epochs_compared: int = 0
    epochs_identical: int = 0
    epochs_divergent: int = 0
    records_a: int = 0
    records_b: int = 0
    only_in_a: int = 0
    only_in_b: int = 0
    first_divergent_epoch: int | None = None
    held_record_count_max: int = 0  # records one side held at once (memory: x 64 bytes)

    @property
    def identical(self) -> bool:
        return self.epochs_divergent == 0

    def line(self) -> str:
        return (f"{self.epochs_compared} epochs compared: {self.epochs_identical} identical, "
                f"{self.epochs_divergent} divergent; {self.records_a} records in A, "
                f"{self.records_b} in B; {self.only_in_a} only in A, {self.only_in_b} only in B")

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self) | {"identical": self.identical}


# -- grouping a stream into epochs --------------------------------------------------


class EpochGrouper:
    """Cuts one side's record stream into complete epochs, in ascending order.

    Holds the records of at most EPOCH_OVERLAP_COUNT + 1 epochs (each at most
    `epoch_record_count_max`), as arrays in arrival order.
    """

    def __init__(self, side: str, epoch_record_count_max: int):
        self.side = side
        self.epoch_record_count_max = epoch_record_count_max
        self._open: dict[int, list[numpy.ndarray]] = {}
        self._counts: dict[int, int] = {}
        self._closed_below = 0  # every epoch below this was handed out
        self._newest = -1
        self.record_count = 0
        # The most records held at once (the memory bound, in records of 64 bytes).
        self.held_record_count_max = 0

    def feed(self, array: numpy.ndarray) -> list[tuple[int, numpy.ndarray]]:
        """Add records (arrival order); return the epochs this completed."""
        if not len(array):
            return []
        epochs = array["epoch"]
        first = int(epochs[0])
        if first == int(epochs[-1]) and bool((epochs == first).all()):
            parts = [(first, array)]
        else:
            if bool((epochs[1:] >= epochs[:-1]).all()):  # in order: slices, no copy
                ordered, rows = epochs, array
            else:
                order = stable_order(epochs)
                ordered, rows = epochs[order], gather(array, order)
            cuts = (numpy.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()
            parts = [(int(ordered[start]), rows[start:end])
                     for start, end in zip([0, *cuts], [*cuts, len(array)])]
        for epoch, part in parts:
            if epoch < self._closed_below:
                raise DiffSourceError(
                    f"{self.side}: a record of epoch {epoch} arrived after epoch {self._newest} "
                    f"(near record {self.record_count}); diff holds an epoch open only until "
                    f"epoch + {EPOCH_OVERLAP_COUNT + 1} arrives (EPOCH_OVERLAP_COUNT), so the "
                    "source's epochs must be (nearly) in order")
            count = self._counts.get(epoch, 0) + len(part)
            if count > self.epoch_record_count_max:
                raise DiffSourceError(
                    f"{self.side}: epoch {epoch} holds more than {self.epoch_record_count_max} "
                    f"records (the per-epoch limit, DIFF_EPOCH_RECORD_COUNT_MAX); raise it "
                    f"with --epoch-record-max N (memory: 64 bytes x N per side, twice "
                    f"with the overlapping epoch), or narrow the diff with --epochs")
            self._counts[epoch] = count
            self._open.setdefault(epoch, []).append(part)
        self.record_count += len(array)
        self.held_record_count_max = max(self.held_record_count_max, sum(self._counts.values()))
        self._newest = max(self._newest, parts[-1][0])
        return self._close_below(self._newest - EPOCH_OVERLAP_COUNT)

    def _close_below(self, bound: int) -> list[tuple[int, numpy.ndarray]]:
        if bound <= self._closed_below:
            return []
        self._closed_below = bound
        done = sorted(epoch for epoch in self._open if epoch < bound)
        result = []
        for epoch in done:
            pieces = self._open.pop(epoch)
            del self._counts[epoch]
            result.append((epoch, pieces[0] if len(pieces) == 1 else numpy.concatenate(pieces)))
        return result

    def finish(self) -> list[tuple[int, numpy.ndarray]]:
        """Every epoch still open (the stream ended)."""
        return self._close_below(1 << 33)


# -- comparing one epoch ------------------------------------------------------------


RECORD_VOID_DTYPE = numpy.dtype((numpy.void, RECORD_SIZE_BYTES))
# Values below this are sorted as u16 (numpy's stable sort of 16-bit integers
# is a radix sort, about 10x faster than its merge sort of u32).
RADIX_SORT_VALUE_LIMIT = 1 << 16


def gather(array: numpy.ndarray, indices: numpy.ndarray) -> numpy.ndarray:
    """array[indices], copied as opaque 64-byte rows (several times faster than
    fancy indexing of the structured dtype, which copies field by field)."""
    return numpy.take(array.view(RECORD_VOID_DTYPE), indices).view(RECORD_DTYPE)


def stable_order(values: numpy.ndarray) -> numpy.ndarray:
    """numpy.argsort(values, kind="stable"), by radix sort when the values' span allows."""
    if not len(values):
        return numpy.empty(0, dtype=numpy.intp)
    low = values.min()
    if int(values.max()) - int(low) < RADIX_SORT_VALUE_LIMIT:
        return numpy.argsort((values - low).astype(numpy.uint16), kind="stable")
    return numpy.argsort(values, kind="stable")


def _keys(array: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(order, keys): `order` sorts the records by (slot_idx, arrival); keys[i] is
    slot_idx << 32 | occurrence of the record array[order[i]], ascending."""
    slots = array["slot_idx"]
    order = stable_order(slots)
    ordered = slots[order].astype(numpy.uint64)
    count = len(ordered)
    index = numpy.arange(count, dtype=numpy.uint64)
    starts = numpy.ones(count, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    run_start = numpy.maximum.accumulate(numpy.where(starts, index, 0))
    return order, (ordered << numpy.uint64(32)) | (index - run_start)


def _qwords(array: numpy.ndarray) -> numpy.ndarray:
    """Records as rows of eight u64 (the compare mask is per byte, so alignment of
    fields inside the u64s does not matter)."""
    return array.view(numpy.uint64).reshape(-1, RECORD_SIZE_BYTES // 8)


def _field_value(record: SlotRecord, name: str):
    value = getattr(record, name)
    if name == "failure_class":
        return failure_class_name(value)
    if name == "output_digest":
        return f"{value:016x}"
    if name == "magic":
        return f"0x{value:08x}"
    if name == "args":
        return list(value)
    return value


def compare_epoch(epoch: int, a: numpy.ndarray, b: numpy.ndarray,
                  options: DiffOptions) -> EpochDiff:
    """Compare one epoch's records of A and B (each in arrival order)."""
    order_a, keys_a = _keys(a)
    order_b, keys_b = _keys(b)
    if len(keys_a) == len(keys_b) and numpy.array_equal(keys_a, keys_b):
        matched_a, matched_b = order_a, order_b
        only_a = only_b = numpy.empty(0, dtype=numpy.intp)
        common_keys = keys_a
    else:
        common_keys, in_a, in_b = numpy.intersect1d(keys_a, keys_b, assume_unique=True,
                                                    return_indices=True)
        matched_a, matched_b = order_a[in_a], order_b[in_b]
        keep_a = numpy.ones(len(keys_a), dtype=bool)
        keep_a[in_a] = False
        keep_b = numpy.ones(len(keys_b), dtype=bool)
        keep_b[in_b] = False
        only_a, only_b = numpy.flatnonzero(keep_a), numpy.flatnonzero(keep_b)
    rows_a, rows_b = _qwords(gather(a, matched_a)), _qwords(gather(b, matched_b))
    unequal = numpy.bitwise_xor(rows_a, rows_b, out=rows_a)
    unequal &= options.byte_mask
    # One whole-array test first: a row-wise reduction costs ten times more, and
    # most epochs of a diff are identical.
    differing = (numpy.flatnonzero(numpy.bitwise_or.reduce(unequal, axis=1))
                 if unequal.any() else numpy.empty(0, dtype=numpy.intp))
    order_mismatch = None
    if options.strict_order:
        order_mismatch = _order_mismatch(order_a, keys_a, order_b, keys_b, common_keys)
    # The details: the first slots (in slot order) that differ or are one-sided.
    limit = options.detail_slot_count_max
    details: list[tuple[int, SlotDiff]] = []
    for index in differing[:limit].tolist():
        key = int(common_keys[index])
        record_a = SlotRecord.decode(a[matched_a[index]].tobytes())
        record_b = SlotRecord.decode(b[matched_b[index]].tobytes())
        fields = tuple((name, _field_value(record_a, name), _field_value(record_b, name))
                       for name in options.compared_fields
                       if getattr(record_a, name) != getattr(record_b, name))
        details.append((key, SlotDiff(key >> 32, key & 0xFFFF_FFFF, "fields", fields)))
    for kind, keys, indices in (("only_a", keys_a, only_a), ("only_b", keys_b, only_b)):
        for index in indices[:limit].tolist():
            key = int(keys[index])
            details.append((key, SlotDiff(key >> 32, key & 0xFFFF_FFFF, kind)))
    details.sort(key=lambda item: item[0])
    return EpochDiff(epoch, len(a), len(b), len(differing), len(only_a), len(only_b),
                     tuple(slot for _, slot in details[:limit]), order_mismatch)


def _order_mismatch(order_a, keys_a, order_b, keys_b, common_keys):
    """The first arrival position where the matched records' order differs, or None."""
    arrival_a = numpy.empty_like(keys_a)
    arrival_a[order_a] = keys_a
    arrival_b = numpy.empty_like(keys_b)
    arrival_b[order_b] = keys_b
    if len(common_keys) != len(keys_a) or len(common_keys) != len(keys_b):
        arrival_a = arrival_a[numpy.isin(arrival_a, common_keys, assume_unique=True)]
        arrival_b = arrival_b[numpy.isin(arrival_b, common_keys, assume_unique=True)]
    unequal = numpy.flatnonzero(arrival_a != arrival_b)
    if not len(unequal):
        return None
    position = int(unequal[0])
    return position, int(arrival_a[position]) >> 32, int(arrival_b[position]) >> 32


def one_sided_epoch(epoch: int, records: numpy.ndarray, side: str,
                    options: DiffOptions) -> EpochDiff:
    empty = records[:0]
    if side == "a":
        return compare_epoch(epoch, records, empty, options)
    return compare_epoch(epoch, empty, records, options)


# -- driving two streams --------------------------------------------------------------


RecordStream = AsyncIterator[numpy.ndarray]


async def diff_streams(stream_a: RecordStream, stream_b: RecordStream, options: DiffOptions,
                       on_epoch: Callable[[EpochDiff], None] | None = None) -> DiffSummary:
    """Merge the two sides epoch by epoch; call `on_epoch` with every divergent epoch."""
    summary = DiffSummary()
    sides = [_Side("A", stream_a, options), _Side("B", stream_b, options)]
    while True:
        for side in sides:
            await side.fill()
        side_a, side_b = sides
        if not side_a.ready and not side_b.ready:
            break
        epoch_a = side_a.ready[0][0] if side_a.ready else None
        epoch_b = side_b.ready[0][0] if side_b.ready else None
        if epoch_b is None or (epoch_a is not None and epoch_a < epoch_b):
            epoch, records = side_a.ready.pop(0)
            result = one_sided_epoch(epoch, records, "a", options)
        elif epoch_a is None or epoch_b < epoch_a:
            epoch, records = side_b.ready.pop(0)
            result = one_sided_epoch(epoch, records, "b", options)
        else:
            epoch, records_a = side_a.ready.pop(0)
            _, records_b = side_b.ready.pop(0)
            result = compare_epoch(epoch, records_a, records_b, options)
        summary.epochs_compared += 1
        summary.only_in_a += result.only_a_count
        summary.only_in_b += result.only_b_count
        if result.divergent:
            summary.epochs_divergent += 1
            if summary.first_divergent_epoch is None:
                summary.first_divergent_epoch = epoch
            if on_epoch is not None:
                on_epoch(result)
        else:
            summary.epochs_identical += 1
        await trio.lowlevel.checkpoint()
    summary.records_a, summary.records_b = (side.grouper.record_count for side in sides)
    summary.held_record_count_max = max(side.grouper.held_record_count_max for side in sides)
    return summary


class _Side:
    def __init__(self, name: str, stream: RecordStream, options: DiffOptions):
        self.stream = stream
        self.options = options
        self.grouper = EpochGrouper(name, options.epoch_record_count_max)
        self.ready: list[tuple[int, numpy.ndarray]] = []
        self.done = False

    async def fill(self) -> None:
        """Read until an epoch is complete or the stream ends."""
        options = self.options
        narrowed = options.epoch_min > 0 or options.epoch_max < 0xFFFF_FFFF
        while not self.ready and not self.done:
            try:
                array = await self.stream.__anext__()
            except StopAsyncIteration:
                self.done = True
                self.ready.extend(self.grouper.finish())
                return
            if narrowed:
                epochs = array["epoch"]
                array = array[(epochs >= options.epoch_min) & (epochs <= options.epoch_max)]
            self.ready.extend(self.grouper.feed(array))


def arrays_from_bytes(pieces: Iterable[bytes]) -> RecordStream:
    """An in-memory stream (tests and bench)."""
    async def stream():
        for piece in pieces:
            yield numpy.frombuffer(piece, dtype=RECORD_DTYPE)
    return stream()
