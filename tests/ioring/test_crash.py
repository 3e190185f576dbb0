"""Crash safety of the ring file, by enumeration.

A real run (io="threads", sync="batch") appends batches of random sizes until
the ring has wrapped several times. The `observer` hook of `open_ring` hands
us every chain before it is submitted, so we know every write and every
fdatasync the engine issues, in order. From that record we build, in memory,
the file a crash could leave at every point between operations, put it on
disk, open it (recovery runs on open) and check what comes back.

The crash model
---------------

- `image[n]` is the durable image once chain n-1's fdatasync completed: the
  file right after creation with every write of chains 0..n-1 applied. The
  recorder checks that this model equals the real file after every batch, so
  the observer really saw every byte the engine wrote.
- A crash while chain n is in flight (any number k of its writes issued, its
  fdatasync not completed) leaves `image[n]` plus ANY SUBSET of the issued
  writes: the page cache writes back in any order. Every subset of the first
  k writes is a subset of all of them, so enumerating every subset of the
  chain's writes covers every k. Chains have 3 to 5 writes (one or two data
  writes, one or two chunk-table writes, one header write).
- On top of such a subset, ONE write of the chain that is not in the subset
  may be torn. Any write may be the torn one, not only the last one issued:
  a power cut can tear any write whose pages had not reached the medium. A
  torn write is split at 512-byte boundaries of the FILE offset; one sector
  holds random bytes (only the part of that sector the write covers) and
  either the sectors before it land and those after it do not ("prefix"), or
  the sectors after it land and those before it do not ("suffix": a
  multi-page write may land its later pages and not its earlier ones, as
  docs/FORMAT.md "Crash model" says). Arbitrary sector subsets of one write
  are not enumerated. The model assumes the device never alters bytes it was
  not asked to write: bytes outside the chain's write ranges keep their
  durable value. The normal run tears each write at up to
  TEARS_PER_WRITE_NORMAL sectors (first, last, one on a page boundary, one at
  random); the soak run tears at every sector.
- A crash right after chain n's fdatasync completed leaves `image[n + 1]`, and
  batch n is acknowledged. That image equals "every write of chain n landed,
  fdatasync not done", so it is checked once, under the stricter acked rules.

What is checked for every crash state
-------------------------------------

Recovery (open) never raises. Every acknowledged record that is still
retained comes back byte-identical at its sequence: the recovered oldest may
pass the acknowledged oldest only by the chunks chain n was evicting (never
past the oldest chain n's own header sets) and the recovered cursor never
falls below the acknowledged cursor. Nothing unacknowledged appears: records
past the acknowledged cursor must be byte-identical to the records chain n
published at those sequences (a fully landed prefix of batch n may survive,
as the engine documents; we count it), never garbage, never anything past
chain n. Sequences are contiguous: reading the whole retained range returns
exactly (next - oldest) records. The recovery report matches the recovered
range and drops only inside the expected windows. Finally the recovered ring
must stay writable: we append more batches (sequences continue from the
recovered cursor), close, reopen and read everything back.

Recovery may also roll forward past the durable header's cursor over a batch
whose data and chunk entries verified (its header copy torn or not landed);
that is one more way a fully landed prefix of batch n survives, and it is
checked like the others.

Violations are collected per property; each property is its own test, so a
failure names the property and shows concrete crash states.

Engine bugs this enumeration found (fixed in 7caa71c; the regression tests at
the bottom are minimal replays of each): recovery cut acknowledged records as
a "torn tail" when the batch in flight was evicting chunks of the previous
batch; the head check stopped at the first chunk that verified, leaving a
damaged newer chunk retained; and a stale full-chunk entry of a crashed batch
could outrank, after a later reopen, the entry of the records rewritten at
those sequences.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import random
import struct
import tempfile
import time

import pytest

from ringtail.ioring.chain import FDATASYNC, Write
from ringtail.ioring.record import RECORD_SIZE_BYTES, SlotRecord
from ringtail.ioring.ring import open_ring

# The crash model's unit of tearing, and format facts (docs/FORMAT.md,
# ioring/format.py docstring) restated here so the test does not borrow the
# engine's arithmetic.
SECTOR_SIZE_BYTES = 512
PAGE_SIZE_BYTES = 4096
CHUNK_RECORD_COUNT = 64
CHUNK_ENTRY_SIZE_BYTES = 32
HEADER_COPY_OFFSETS = (0, 4096)
HEADER_SIZE_BYTES = 128
HEADER_GENERATION_OFFSET = 16
U64 = struct.Struct("<Q")
TENANT_ID = 1

# Record tags (args[0]) keep the records of the recorded run and those written
# after recovery distinct at every sequence.
TAG_RUN = 0xA11CE
TAG_CONTINUATION = 0xC0FFEE

TEARS_PER_WRITE_NORMAL = 4

# The properties, one test each.
RAISES = "recovery never raises"
ACKED = "acknowledged retained records come back byte-identical"
UNACKED = "nothing unacknowledged appears as valid data"
CONTIGUOUS = "sequences stay contiguous"
REPORT = "recovery report is coherent"
WRITABLE = "the recovered ring stays writable and reopens intact"
PROPERTIES = (RAISES, ACKED, UNACKED, CONTIGUOUS, REPORT, WRITABLE)


# -- recording a run ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chain:
    """One batch's chain and the retained ranges around it."""

    index: int
    first_sequence: int
    record_count: int
    writes: tuple[Write, ...]
    acked_oldest: int  # the durable header before this chain: retained range
    acked_next: int
    oldest: int  # retained range once this chain is durable
    next_sequence: int
    previous_generation: int  # the durable header's generation
    generation: int  # the header generation this chain writes


@dataclasses.dataclass
class Run:
    capacity: int
    seed: int
    batch_max: int  # the ring's batch_record_count_max
    images: list[bytes]  # images[n]: the durable file before chain n
    chains: list[Chain]
    published: bytes  # the record of sequence s is at [64 s, 64 s + 64)


def make_records(first_sequence: int, count: int, tag: int, batch: int) -> bytes:
    return b"".join(
        SlotRecord(timestamp_ns=sequence, slot_idx=sequence & 0xFFFFFFFF, tenant_id=TENANT_ID,
                   opcode=batch, args=(tag, sequence & 0xFFFFFFFF, batch, 7)).encode()
        for sequence in range(first_sequence, first_sequence + count))


def evict(oldest: int, next_sequence: int, capacity: int) -> int:
    """Oldest retained sequence once records below `next_sequence` exist: the
    ring gives up a whole chunk before reusing any slot of it."""
    chunk_end = -(-next_sequence // CHUNK_RECORD_COUNT) * CHUNK_RECORD_COUNT
    return max(oldest, chunk_end - capacity)


def chunk_start(sequence: int) -> int:
    return sequence - sequence % CHUNK_RECORD_COUNT


def table_size(capacity: int) -> int:
    entries = capacity // CHUNK_RECORD_COUNT * CHUNK_ENTRY_SIZE_BYTES
    return -(-entries // PAGE_SIZE_BYTES) * PAGE_SIZE_BYTES


def table_offset(capacity: int, table: int) -> int:
    return 2 * PAGE_SIZE_BYTES + table * table_size(capacity)


def data_offset(capacity: int) -> int:
    return table_offset(capacity, 2)


def header_generation(data: bytes, offset: int = 0) -> int:
    return U64.unpack_from(data, offset + HEADER_GENERATION_OFFSET)[0]


def read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def write_image(path: str, image: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, image)
    finally:
        os.close(fd)


def apply(image: bytearray, write: Write) -> None:
    image[write.offset:write.offset + len(write.data)] = write.data


def choose_batch_size(rng: random.Random, capacity: int, next_sequence: int, maximum: int) -> int:
    kind = rng.choices(("one", "max", "to_chunk", "wrap", "random"), (1, 1, 1, 2, 3))[0]
    if kind == "one":
        return 1
    if kind == "max":
        return maximum
    if kind == "to_chunk":  # end exactly on a chunk boundary (when a batch can)
        to_boundary = (-next_sequence) % CHUNK_RECORD_COUNT or CHUNK_RECORD_COUNT
        if to_boundary <= maximum:
            return to_boundary
    if kind == "wrap":  # cross the end of the data region inside this batch
        to_end = capacity - next_sequence % capacity
        if to_end < maximum:
            return rng.randint(to_end + 1, maximum)
    return rng.randint(1, maximum)


def record_run(directory: str, capacity: int, seed: int, batch_count: int = 0,
               sizes: list[int] | None = None) -> Run:
    """Run the engine for real and record every chain it submits. Batch sizes
    are `sizes`, or `batch_count` random ones."""
    rng = random.Random(f"run/{capacity}/{seed}")
    path = os.path.join(directory, f"recorded-{capacity}-{seed}.ring")
    submitted: list[list] = []
    published = bytearray()
    chains: list[Chain] = []
    ring = open_ring(path, capacity=capacity, tenant_id=TENANT_ID, io="threads",
                     sync="batch", observer=submitted.append)
    with ring:
        images = [read_file(path)]  # before any batch
        generation = max(header_generation(images[0], offset) for offset in HEADER_COPY_OFFSETS)
        maximum = ring.batch_record_count_max
        for index in range(len(sizes) if sizes is not None else batch_count):
            first = ring.next_sequence
            acked_oldest, acked_next = ring.oldest_sequence, ring.next_sequence
            count = sizes[index] if sizes is not None else \
                choose_batch_size(rng, capacity, first, maximum)
            records = make_records(first, count, TAG_RUN, index)
            ticket = ring.append(records)
            assert (ticket.first_sequence, ticket.record_count) == (first, count)
            assert len(submitted) == 1, "one chain per batch"
            operations = submitted.pop()
            # sync="batch": the chain is its writes, then one fdatasync, last.
            assert operations[-1] is FDATASYNC
            writes = tuple(operations[:-1])
            assert writes and all(isinstance(op, Write) for op in writes)
            spans = sorted((w.offset, w.offset + len(w.data)) for w in writes)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "writes overlap"
            headers = [w for w in writes if w.offset in HEADER_COPY_OFFSETS]
            assert len(headers) == 1 and len(headers[0].data) == HEADER_SIZE_BYTES
            new_generation = header_generation(headers[0].data)
            assert new_generation == generation + 1
            image = bytearray(images[-1])
            for write in writes:
                apply(image, write)
            assert image == read_file(path), f"chain {index}: the file differs from the model"
            images.append(bytes(image))
            published += records
            assert ring.next_sequence == first + count
            assert ring.oldest_sequence == evict(acked_oldest, first + count, capacity)
            chains.append(Chain(index, first, count, writes, acked_oldest, acked_next,
                                ring.oldest_sequence, ring.next_sequence,
                                generation, new_generation))
            generation = new_generation
    return Run(capacity, seed, maximum, images, chains, bytes(published))


def coverage(run: Run) -> dict[str, int]:
    """Which situations the recorded run exercised (asserted by the tests)."""
    chains = run.chains
    maximum = run.batch_max
    return {
        "laps": chains[-1].next_sequence // run.capacity,
        "batches of 1": sum(c.record_count == 1 for c in chains),
        "batches of max": sum(c.record_count == maximum for c in chains),
        "wrap inside a batch": sum(
            c.first_sequence // run.capacity != (c.next_sequence - 1) // run.capacity
            for c in chains),
        "start on a chunk boundary": sum(c.first_sequence % CHUNK_RECORD_COUNT == 0
                                         for c in chains),
        "end on a chunk boundary": sum(c.next_sequence % CHUNK_RECORD_COUNT == 0
                                       for c in chains),
        "cross a chunk boundary": sum(
            chunk_start(c.first_sequence) != chunk_start(c.next_sequence - 1) for c in chains),
        "evicting": sum(c.oldest > c.acked_oldest for c in chains),
        "chains of 5 writes": sum(len(c.writes) >= 5 for c in chains),
        "split data writes": sum(
            sum(w.offset >= data_offset(run.capacity) for w in c.writes) == 2 for c in chains),
    }


# -- enumerating crash states -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrashState:
    label: str
    image: bytes
    chain: Chain | None  # the chain the crash concerns (None: before any batch)
    acked: bool  # True: that chain's fdatasync completed


def sector_pieces(write: Write) -> list[tuple[int, int]]:
    """The write's byte range split at 512-byte boundaries of the file offset."""
    start, end = write.offset, write.offset + len(write.data)
    pieces = []
    while start < end:
        stop = min(end, (start // SECTOR_SIZE_BYTES + 1) * SECTOR_SIZE_BYTES)
        pieces.append((start, stop))
        start = stop
    return pieces


def tear_points(pieces: list[tuple[int, int]], rng: random.Random,
                limit: int | None) -> list[int]:
    """Indices of the sector that holds random bytes when the write tears."""
    count = len(pieces)
    if limit is None or count <= limit:
        return list(range(count))
    chosen = {0, count - 1}
    on_page = [j for j, (start, _) in enumerate(pieces)
               if start % PAGE_SIZE_BYTES == 0 and j not in chosen]
    if on_page:
        chosen.add(rng.choice(on_page))
    while len(chosen) < limit:
        chosen.add(rng.randrange(count))
    return sorted(chosen)


def tear(image: bytearray, write: Write, pieces: list[tuple[int, int]], at: int,
         landed: str, rng: random.Random) -> None:
    """Sector `at` gets random bytes (only where the write itself covers it);
    the sectors before it ("prefix") or after it ("suffix") land, the others
    never do."""
    for start, stop in (pieces[:at] if landed == "prefix" else pieces[at + 1:]):
        image[start:stop] = write.data[start - write.offset:stop - write.offset]
    start, stop = pieces[at]
    image[start:stop] = rng.randbytes(stop - start)


def crash_states(run: Run, rng: random.Random, tears_per_write: int | None):
    """Every crash state of the run (see the module docstring), lazily."""
    yield CrashState("before any batch", run.images[0], None, True)
    for chain in run.chains:
        base = run.images[chain.index]
        writes = chain.writes
        everything = range(len(writes))
        for size in range(len(writes)):  # the full set is the acked state below
            for subset in itertools.combinations(everything, size):
                image = bytearray(base)
                for i in subset:
                    apply(image, writes[i])
                yield CrashState(f"chain {chain.index} in flight, landed writes {subset}",
                                 bytes(image), chain, False)
        for torn in everything:
            pieces = sector_pieces(writes[torn])
            others = [i for i in everything if i != torn]
            directions = ("prefix", "suffix") if len(pieces) > 1 else ("prefix",)
            for at, landed in itertools.product(tear_points(pieces, rng, tears_per_write),
                                                directions):
                for size in range(len(others) + 1):
                    for subset in itertools.combinations(others, size):
                        image = bytearray(base)
                        for i in subset:
                            apply(image, writes[i])
                        tear(image, writes[torn], pieces, at, landed, rng)
                        yield CrashState(
                            f"chain {chain.index} in flight, landed writes {subset}, write "
                            f"{torn} (offset {writes[torn].offset}, {len(writes[torn].data)} "
                            f"bytes) torn in sector {at} of {len(pieces)}, {landed} landed",
                            bytes(image), chain, False)
        yield CrashState(f"chain {chain.index} acknowledged", run.images[chain.index + 1],
                         chain, True)


# -- checking one crash state ----------------------------------------------------


@dataclasses.dataclass
class Outcome:
    states: int = 0
    acked_states: int = 0
    unacked_prefix_survived: int = 0  # the in-flight batch's landed prefix kept
    head_dropped: int = 0  # the report names lost oldest records
    tail_dropped: int = 0  # the report names a dropped tail
    rolled_forward: int = 0  # the report names records kept past the header
    continued: int = 0  # recovered rings written to and reopened intact
    violations: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    coverage: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, prop: str, label: str, message: str) -> None:
        self.violations[prop].append(f"{label}: {message}")


def first_unreadable(ring, oldest: int, next_sequence: int) -> tuple[int, str] | None:
    """The first chunk-sized piece of [oldest, next) whose read raises."""
    sequence = oldest
    while sequence < next_sequence:
        stop = min(next_sequence, chunk_start(sequence) + CHUNK_RECORD_COUNT)
        try:
            ring.read(sequence, stop - sequence)
        except Exception as error:  # noqa: BLE001 - any raise is the finding
            return sequence, f"{type(error).__name__}: {error}"
        sequence = stop
    return None


def continuation_sizes(rng: random.Random, next_sequence: int, maximum: int) -> list[int]:
    """Batch sizes to append after recovery, ending with a batch of one so that
    the chunks before it are no longer the last batch's (recovery does not
    verify those on open; only reads do).

    Half the time: random sizes over one to two and a half chunks, rewriting
    the chunks the crashed batch touched from batches that start in
    different chunks (so entries go to both table copies). Otherwise: one
    record, then one batch that finishes the current chunk and fills the next
    one whole (when a batch can hold that many), then one record: the next
    chunk's only entry then goes to the table copy other than the one the
    single record used, the pattern in which a stale full-chunk entry left by
    the crashed batch would tie with it."""
    if rng.random() < 0.5:
        goal = rng.randint(CHUNK_RECORD_COUNT, 2 * CHUNK_RECORD_COUNT + 32)
        sizes = []
        while sum(sizes) < goal:
            sizes.append(rng.randint(1, min(maximum, 80)))
        return sizes + [1]
    across = min(maximum, (-(next_sequence + 1)) % CHUNK_RECORD_COUNT + CHUNK_RECORD_COUNT)
    return [1, across, 1]


def check_state(path: str, run: Run, state: CrashState, rng: random.Random,
                outcome: Outcome) -> None:
    label = f"[capacity {run.capacity} seed {run.seed}] {state.label}"
    chain = state.chain
    if chain is None:  # the freshly created file
        min_oldest = max_oldest = max_next = acked_next = 0
        header_ranges = {(0, 0)}
        generations = {1}
    elif state.acked:
        min_oldest = max_oldest = chain.oldest
        max_next = acked_next = chain.next_sequence
        header_ranges = {(chain.oldest, chain.next_sequence)}
        generations = {chain.generation}
    else:
        min_oldest, max_oldest = chain.acked_oldest, chain.oldest
        max_next = chain.next_sequence
        acked_next = chain.acked_next  # the lower bound on the recovered next
        header_ranges = {(chain.acked_oldest, chain.acked_next),
                         (chain.oldest, chain.next_sequence)}
        generations = {chain.previous_generation, chain.generation}

    write_image(path, state.image)
    outcome.states += 1
    outcome.acked_states += state.acked
    try:
        ring = open_ring(path, tenant_id=TENANT_ID, io="threads")
    except Exception as error:  # noqa: BLE001 - recovery must never raise here
        outcome.add(RAISES, label, f"open_ring raised {type(error).__name__}: {error}")
        return
    with ring:
        oldest, next_sequence = ring.oldest_sequence, ring.next_sequence
        report = ring.recovery_report
        generation = report.header_generation

        # The retained range: acked records kept, nothing past chain n's cursor.
        if oldest > max_oldest:
            outcome.add(ACKED, label, f"recovered oldest {oldest} passes {max_oldest}, the "
                                      "oldest the batch in flight could evict to")
        if next_sequence < acked_next:
            outcome.add(ACKED, label, f"recovered next {next_sequence} is below the "
                                      f"acknowledged next {acked_next}")
        if oldest < min_oldest:
            outcome.add(UNACKED, label, f"recovered oldest {oldest} is below {min_oldest}: "
                                        "evicted records resurrected")
        if next_sequence > max_next:
            outcome.add(UNACKED, label, f"recovered next {next_sequence} is past {max_next}, "
                                        "beyond every published record")
        if not oldest <= next_sequence or next_sequence - oldest > run.capacity:
            outcome.add(CONTIGUOUS, label, f"impossible range {oldest}..{next_sequence}")
            return
        if next_sequence > acked_next and not state.acked:
            outcome.unacked_prefix_survived += 1

        # Everything retained reads back, verified, contiguous, byte-identical.
        data = b""
        if next_sequence > oldest:
            try:
                data = ring.read(oldest, next_sequence - oldest)
            except Exception as error:  # noqa: BLE001
                bad = first_unreadable(ring, oldest, next_sequence)
                where = bad[0] if bad else oldest
                outcome.add(ACKED if where < acked_next else UNACKED, label,
                            f"reading retained {oldest}..{next_sequence - 1} raised at "
                            f"sequence {where}: {type(error).__name__}: {error}")
                return
        if len(data) != (next_sequence - oldest) * RECORD_SIZE_BYTES:
            outcome.add(CONTIGUOUS, label, f"read {len(data)} bytes for "
                                           f"{next_sequence - oldest} records")
            return
        expected = run.published[oldest * RECORD_SIZE_BYTES:next_sequence * RECORD_SIZE_BYTES]
        if data != expected:
            for offset in range(0, len(data), RECORD_SIZE_BYTES):
                if data[offset:offset + RECORD_SIZE_BYTES] != \
                        expected[offset:offset + RECORD_SIZE_BYTES]:
                    sequence = oldest + offset // RECORD_SIZE_BYTES
                    outcome.add(ACKED if sequence < acked_next else UNACKED, label,
                                f"record {sequence} is not the record published there")
                    break
            return

        # The report tells the same story and drops only inside the windows.
        problems = []
        if report.created:
            problems.append("created=True for an existing file")
        if (report.oldest_sequence, report.next_sequence) != (oldest, next_sequence):
            problems.append(f"report range {report.oldest_sequence}..{report.next_sequence} "
                            f"is not the ring's {oldest}..{next_sequence}")
        if generation not in generations:
            problems.append(f"header generation {generation} is not one of "
                            f"{sorted(generations)}")
        if report.dropped_tail is not None:
            outcome.tail_dropped += 1
            low, high = report.dropped_tail
            if low != next_sequence or not any(high == n - 1 for _, n in header_ranges):
                problems.append(f"dropped_tail {report.dropped_tail} does not run from the "
                                f"recovered next {next_sequence} to a header's cursor")
            if low < acked_next:
                problems.append(f"dropped_tail {report.dropped_tail} covers acknowledged "
                                f"records (acknowledged next {acked_next})")
        if report.rolled_forward is not None:
            outcome.rolled_forward += 1
            low, high = report.rolled_forward
            if (low, high) != (acked_next, next_sequence - 1) or state.acked or \
                    generation != chain.previous_generation or report.dropped_tail:
                problems.append(f"rolled_forward {report.rolled_forward} is not "
                                f"{acked_next}..{next_sequence - 1} past the previous "
                                "header's cursor")
        if report.dropped_head is not None:
            outcome.head_dropped += 1
            low, high = report.dropped_head
            if high != oldest - 1 or not any(low == o for o, _ in header_ranges):
                problems.append(f"dropped_head {report.dropped_head} does not run from a "
                                f"header's oldest to the recovered oldest {oldest}")
            if high >= max_oldest:
                problems.append(f"dropped_head {report.dropped_head} reaches past the "
                                f"eviction window ending at {max_oldest - 1}")
        if problems:
            outcome.add(REPORT, label, "; ".join(problems))

        # The recovered ring takes new batches; sequences continue from next.
        sizes = continuation_sizes(rng, next_sequence, ring.batch_record_count_max)
        blob = bytearray(run.published[:next_sequence * RECORD_SIZE_BYTES])
        model_oldest, model_next = oldest, next_sequence
        try:
            for number, size in enumerate(sizes):
                records = make_records(model_next, size, TAG_CONTINUATION, number)
                ticket = ring.append(records)
                if ticket.first_sequence != model_next:
                    raise AssertionError(f"a batch after recovery got first sequence "
                                         f"{ticket.first_sequence}, expected {model_next}")
                blob += records
                model_next += size
                model_oldest = evict(model_oldest, model_next, run.capacity)
            if (ring.oldest_sequence, ring.next_sequence) != (model_oldest, model_next):
                raise AssertionError(f"after appending: {ring.oldest_sequence}.."
                                     f"{ring.next_sequence}, expected {model_oldest}.."
                                     f"{model_next}")
        except Exception as error:  # noqa: BLE001
            outcome.add(WRITABLE, label, f"appending {sizes} after recovery failed: "
                                         f"{type(error).__name__}: {error}")
            return
    try:
        with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
            report = ring.recovery_report
            if report.dropped_head or report.dropped_tail:
                raise AssertionError(f"a clean reopen dropped records: {report.summary()}")
            if (ring.oldest_sequence, ring.next_sequence) != (model_oldest, model_next):
                raise AssertionError(f"reopened as {ring.oldest_sequence}..{ring.next_sequence}"
                                     f", expected {model_oldest}..{model_next}")
            bad = first_unreadable(ring, model_oldest, model_next)
            if bad:
                raise AssertionError(f"sequence {bad[0]} is unreadable: {bad[1]}")
            if ring.read(model_oldest, model_next - model_oldest) != \
                    blob[model_oldest * RECORD_SIZE_BYTES:]:
                raise AssertionError("records differ from those appended")
    except Exception as error:  # noqa: BLE001
        outcome.add(WRITABLE, label, f"reopening after recovery to {oldest}..{next_sequence} "
                                     f"and appending {sizes}: {type(error).__name__}: {error}")
        return
    outcome.continued += 1


def scratch_directory() -> tempfile.TemporaryDirectory:
    """tmpfs when there is one: thousands of small files and fdatasyncs."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return tempfile.TemporaryDirectory(prefix="ringtail-crash-", dir=shm)
    return tempfile.TemporaryDirectory(prefix="ringtail-crash-")


def enumerate_runs(configs, tears_per_write: int | None) -> Outcome:
    """Record each (capacity, seed, batch_count) run; check all its crash states."""
    outcome = Outcome()
    started = time.monotonic()
    with scratch_directory() as directory:
        for capacity, seed, batch_count in configs:
            run = record_run(directory, capacity, seed, batch_count)
            outcome.coverage.append({"capacity": capacity, "seed": seed, **coverage(run)})
            rng = random.Random(f"crash/{capacity}/{seed}")
            path = os.path.join(directory, "crashed.ring")
            for state in crash_states(run, rng, tears_per_write):
                check_state(path, run, state, rng, outcome)
    outcome.seconds = time.monotonic() - started
    return outcome


def summary(outcome: Outcome) -> str:
    lines = [f"checked {outcome.states} crash states ({outcome.acked_states} acknowledged, "
             f"{outcome.states - outcome.acked_states} with a batch in flight) in "
             f"{outcome.seconds:.1f} s; the in-flight batch's landed prefix survived in "
             f"{outcome.unacked_prefix_survived}, head dropped in {outcome.head_dropped}, "
             f"tail dropped in {outcome.tail_dropped}, rolled forward in "
             f"{outcome.rolled_forward}; {outcome.continued} recovered rings "
             "written to and reopened intact"]
    for prop in PROPERTIES:
        lines.append(f"  {prop}: {len(outcome.violations.get(prop, []))} violations")
    return "\n".join(lines)


def show(violations: list[str], states: int, what: str) -> str:
    shown = "\n  ".join(violations[:8])
    return f"{len(violations)} violations in {states} crash states: {what}, e.g.:\n  {shown}"


# -- the normal run ------------------------------------------------------------

# (capacity, seed, batch count). 256: four chunks and batches up to 192
# records, so one batch can wrap and evict two or three chunks; 128: the
# minimum, two chunks, a 64-record batch evicts a whole chunk; 192: three.
NORMAL_CONFIGS = ((256, 1, 36), (128, 2, 40), (192, 3, 30))


@pytest.fixture(scope="module")
def normal_run() -> Outcome:
    outcome = enumerate_runs(NORMAL_CONFIGS, TEARS_PER_WRITE_NORMAL)
    print("\n" + summary(outcome))
    return outcome


def test_enumerates_many_crash_states_over_wrapping_runs(normal_run):
    print(f"\ncrash enumeration: checked {normal_run.states} crash states")
    assert normal_run.states > 2000
    assert normal_run.acked_states == sum(1 + batches for _, _, batches in NORMAL_CONFIGS)
    assert normal_run.continued > 1000
    for covered in normal_run.coverage:
        for situation in ("batches of 1", "batches of max", "wrap inside a batch",
                          "start on a chunk boundary", "end on a chunk boundary",
                          "cross a chunk boundary", "evicting", "chains of 5 writes",
                          "split data writes"):
            assert covered[situation] > 0, (situation, covered)
        assert covered["laps"] >= 3, covered
    # The documented "fully landed, unacknowledged prefix" case occurs, and so
    # do both kinds of recovery cut.
    assert normal_run.unacked_prefix_survived > 0
    assert normal_run.tail_dropped > 0
    assert normal_run.head_dropped > 0


@pytest.mark.parametrize("prop", [pytest.param(prop, id=prop.replace(" ", "-"))
                                  for prop in PROPERTIES])
def test_crash_property_holds_in_every_state(normal_run, prop):
    found = normal_run.violations.get(prop, [])
    assert not found, show(found, normal_run.states, prop)


# -- regression tests: minimal replays of the engine bugs the enumeration found --


def crash_image(run: Run, chain_index: int, landed) -> bytes:
    """The durable image before the chain plus the chosen writes of it."""
    image = bytearray(run.images[chain_index])
    for i in landed:
        apply(image, run.chains[chain_index].writes[i])
    return bytes(image)


def write_indices(chain: Chain, capacity: int, region: str) -> list[int]:
    """Indices of the chain's writes into the "data" region or the "tables"."""
    start = data_offset(capacity) if region == "data" else table_offset(capacity, 0)
    end = None if region == "data" else data_offset(capacity)
    return [i for i, w in enumerate(chain.writes)
            if w.offset >= start and (end is None or w.offset < end)]


@pytest.fixture
def scratch():
    with scratch_directory() as directory:
        yield directory


@pytest.mark.parametrize("landed", ["data", "all but the header"])
def test_crash_while_evicting_keeps_the_previous_batchs_records(scratch, landed):
    """Capacity 256 (4 chunks). Batches A = 0..95, B = 96..191 acknowledged;
    C = 192..287 in flight evicts chunk 0 (new oldest 64). Crash with C's data
    landed (and, second case, its chunk entries too) but not its header.

    Found on the engine before 7caa71c, where a batch could hold capacity - 64
    records: B's tail check took C's overwrite of a chunk B shared with the
    evicted range for a torn tail and cut the cursor below records that were
    acknowledged and untouched (capacity 256, batches of 192 then 192: the
    ring reopened empty). The fix limits a batch to (capacity - 64) / 2
    records, so evictions and the previous batch never share a chunk."""
    run = record_run(scratch, 256, 0, sizes=[96, 96, 96])
    assert 2 * run.batch_max + CHUNK_RECORD_COUNT <= run.capacity
    chain = run.chains[2]
    assert (chain.acked_oldest, chain.oldest) == (0, 64)
    if landed == "data":
        indices = write_indices(chain, 256, "data")
    else:
        indices = [i for i, w in enumerate(chain.writes) if w.offset not in HEADER_COPY_OFFSETS]
    path = os.path.join(scratch, "crashed.ring")
    write_image(path, crash_image(run, 2, indices))
    with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
        report = ring.recovery_report
        # Data alone cannot verify (no entries): C is cut. With its entries,
        # C is verified and rolled forward.
        expected_next = 192 if landed == "data" else 288
        assert (ring.oldest_sequence, ring.next_sequence) == (64, expected_next), \
            report.summary()
        assert report.dropped_head == (0, 63)
        assert ring.read(64, expected_next - 64) == run.published[64 * 64:expected_next * 64]


def test_crash_with_only_the_wrapped_data_write_landed_reads_every_retained_record(scratch):
    """Capacity 256. After batches 64 x 4, 94, 96 the ring retains 192..445:
    chunk 3 (position 3), 4 (position 0), 5 (position 1), 6 (position 2, part).
    Batch C = 446..541 wraps: data write 0 covers slots 190..255 (evicting
    chunk 3), data write 1 covers slots 0..29 (evicting chunk 4). Crash: only
    data write 1 landed, so chunk 3 is intact and chunk 4 is damaged.

    Found on the engine before 7caa71c: the head check stopped at the first
    chunk that verified (chunk 3), kept 192..445 retained and every read of
    256..319 raised RingCorruptError. Now every chunk in the eviction window
    is checked and the oldest moves past the last one that fails."""
    run = record_run(scratch, 256, 0, sizes=[64] * 4 + [94, 96, 96])
    chain = run.chains[-1]
    assert (chain.acked_oldest, chain.acked_next, chain.oldest) == (192, 446, 320)
    data = write_indices(chain, 256, "data")
    assert len(data) == 2 and chain.writes[data[1]].offset == data_offset(256)
    path = os.path.join(scratch, "crashed.ring")
    write_image(path, crash_image(run, chain.index, [data[1]]))
    with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
        assert (ring.oldest_sequence, ring.next_sequence) == (320, 446), \
            ring.recovery_report.summary()
        assert ring.recovery_report.dropped_head == (192, 319)
        assert ring.read(320, 126) == run.published[320 * 64:446 * 64]


def test_stale_chunk_entry_of_a_crashed_batch_never_shadows_a_rewritten_chunk(scratch):
    """Capacity 256. A = 0..59 (entry of chunk 0 in table 0), B = 60..61
    (table 1), C = 62..157 writes entries for chunks 0, 1 (count 64) and 2 to
    table 0. Crash: only C's chunk-table write landed; recovery opens 0..61.
    Then D = 62 (entry to table 0), E = 63..127 (chunks 0 and 1 to table 1),
    F = 128, and a clean reopen.

    Found on the engine before 7caa71c: C's entry for chunk 1 (first sequence
    64, count 64) stayed in table 0 and tied with E's in table 1; recovery
    took copy 0 without verifying and reads of the acknowledged 64..127 raised
    RingCorruptError. Now recovery erases entries past the recovered cursor."""
    run = record_run(scratch, 256, 0, sizes=[60, 2, 96])
    chain = run.chains[2]
    tables = write_indices(chain, 256, "tables")
    assert [chain.writes[i].offset for i in tables] == [table_offset(256, 0)]
    path = os.path.join(scratch, "crashed.ring")
    write_image(path, crash_image(run, 2, tables))
    appended = bytearray(run.published[:62 * 64])
    with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 62)
        for number, size in enumerate([1, 65, 1]):
            records = make_records(ring.next_sequence, size, TAG_CONTINUATION, number)
            ring.append(records)
            appended += records
        assert ring.read(0, 129) == appended
    with open_ring(path, tenant_id=TENANT_ID, io="threads") as ring:
        assert (ring.oldest_sequence, ring.next_sequence) == (0, 129)
        assert ring.read(0, 129) == appended


# -- the soak run -------------------------------------------------------------------


# RINGTAIL_CRASH_SOAK_SEEDS seeds (default 3) x 4 capacities x 60 batches,
# every tear point: about 73,000 crash states, ~3 minutes on 2 cores.
SOAK_SEED_COUNT = int(os.environ.get("RINGTAIL_CRASH_SOAK_SEEDS", "3"))
SOAK_CONFIGS = tuple((capacity, seed, 60) for seed in range(100, 100 + SOAK_SEED_COUNT)
                     for capacity in (128, 192, 256, 320))


@pytest.mark.soak
def test_crash_enumeration_soak():
    """Many more runs, every tear point; every property must hold."""
    outcome = enumerate_runs(SOAK_CONFIGS, None)
    print("\n" + summary(outcome))
    print(f"soak crash enumeration: checked {outcome.states} crash states")
    assert outcome.states > 10_000 * SOAK_SEED_COUNT
    for prop in PROPERTIES:
        found = outcome.violations.get(prop, [])
        assert not found, show(found, outcome.states, prop)
