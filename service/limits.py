"""The daemon's limits that span modules, how they relate, and what they cost.

Each limit is defined once, beside the code it bounds (the owner's comment
says why and what it costs); this module imports them, asserts at import how
they relate (by reference, never by copied literals), and states the daemon's
worst-case memory as a formula of them. `ringtail serve --limits` prints it;
docs/OPERATIONS.md ("Sizing") explains it.
"""

from __future__ import annotations

import dataclasses

from ringtail.ioring.format import BATCH_RECORD_COUNT_MAX, CAPACITY_RECORD_COUNT_MAX, CHUNK_RECORD_COUNT
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.batcher import PENDING_RECORD_COUNT_MAX
from ringtail.service.connection import (CONNECTION_UNACKED_BATCH_COUNT_MAX, RECEIVE_SIZE_BYTES,
                                         REPLY_COALESCE_COUNT_MAX)
from ringtail.service.gate import CONNECTION_COUNT_MAX, SUBSCRIBER_COUNT_MAX
from ringtail.service.histogram import BATCH_RECORD_COUNT_BOUNDS
from ringtail.service.protocol import (FRAME_HEADER_SIZE_BYTES, FRAME_SIZE_BYTES_MAX,
                                       PUBLISH_RECORD_COUNT_MAX, RECEIVE_BUFFER_BYTES_MAX,
                                       RECORDS_FRAME_RECORD_COUNT_MAX)
from ringtail.service.quotas import TENANT_CONNECTION_COUNT_MAX, TENANT_SUBSCRIBER_COUNT_MAX
from ringtail.service.subscribers import REPLAY_READ_RECORD_COUNT_MAX
from ringtail.service.tenants import TENANT_COUNT_MAX

# -- relations ---------------------------------------------------------------------

# A full publish batch is one ring batch at most, and the batch-size histogram
# has a bucket for the largest.
assert PUBLISH_RECORD_COUNT_MAX <= BATCH_RECORD_COUNT_MAX
assert BATCH_RECORD_COUNT_BOUNDS[-1] == BATCH_RECORD_COUNT_MAX
# A full publish frame fits one frame; the receive buffer holds a partial
# frame plus one read.
assert 8 + PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES <= FRAME_SIZE_BYTES_MAX
assert (RECEIVE_SIZE_BYTES + FRAME_HEADER_SIZE_BYTES + FRAME_SIZE_BYTES_MAX
        <= RECEIVE_BUFFER_BYTES_MAX)
# One replay read becomes one Records frame (never split, never a partial one).
assert REPLAY_READ_RECORD_COUNT_MAX <= RECORDS_FRAME_RECORD_COUNT_MAX
assert 12 + RECORDS_FRAME_RECORD_COUNT_MAX * (8 + RECORD_SIZE_BYTES) <= FRAME_SIZE_BYTES_MAX
# The writer's pending bound admits at least one full publish batch (else a
# publisher could wait forever), and whole chunks.
assert PENDING_RECORD_COUNT_MAX >= PUBLISH_RECORD_COUNT_MAX
assert PENDING_RECORD_COUNT_MAX % CHUNK_RECORD_COUNT == 0
# Per-tenant caps never exceed the daemon's.
assert TENANT_CONNECTION_COUNT_MAX <= CONNECTION_COUNT_MAX
assert SUBSCRIBER_COUNT_MAX <= TENANT_SUBSCRIBER_COUNT_MAX
# A coalesced reply write covers at most the batches a connection may have queued.
assert CONNECTION_UNACKED_BATCH_COUNT_MAX <= REPLY_COALESCE_COUNT_MAX


# -- worst-case memory -------------------------------------------------------------

_PUBLISH_BATCH_SIZE_BYTES = PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
_RECORDS_FRAME_SIZE_BYTES = 12 + RECORDS_FRAME_RECORD_COUNT_MAX * (8 + RECORD_SIZE_BYTES)


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryTerm:
    name: str
    formula: str
    count: int  # how many of it at most
    size_bytes: int  # each

    @property
    def total_bytes(self) -> int:
        return self.count * self.size_bytes


def worst_case_memory(capacity_record_count: int = CAPACITY_RECORD_COUNT_MAX) -> list[MemoryTerm]:
    """The daemon's buffers at their limits, term by term (CPython's own ~45 MiB aside).

    `capacity_record_count`: the largest ring capacity in use (each open ring
    keeps an in-memory mirror of its chunk table: capacity bytes, docs/FORMAT.md).
    """
    table_mirror_bytes = capacity_record_count
    # A connection either publishes or subscribes (docs/PROTOCOL.md, state
    # table), so its output side holds the larger of the two, never both.
    publishing_bytes = CONNECTION_UNACKED_BATCH_COUNT_MAX * _PUBLISH_BATCH_SIZE_BYTES
    subscribing_bytes = REPLAY_READ_RECORD_COUNT_MAX * RECORD_SIZE_BYTES + _RECORDS_FRAME_SIZE_BYTES
    return [
        MemoryTerm("connection receive buffer",
                   "CONNECTION_COUNT_MAX x RECEIVE_BUFFER_BYTES_MAX",
                   CONNECTION_COUNT_MAX, RECEIVE_BUFFER_BYTES_MAX),
        MemoryTerm("publish batches unacknowledged, or a replay read",
                   "CONNECTION_COUNT_MAX x max(CONNECTION_UNACKED_BATCH_COUNT_MAX x "
                   "PUBLISH_RECORD_COUNT_MAX x 64 B, REPLAY_READ_RECORD_COUNT_MAX x 64 B + "
                   "Records frame)",
                   CONNECTION_COUNT_MAX, max(publishing_bytes, subscribing_bytes)),
        MemoryTerm("records waiting for a tenant's writer",
                   "TENANT_COUNT_MAX x PENDING_RECORD_COUNT_MAX x 64 B",
                   TENANT_COUNT_MAX, PENDING_RECORD_COUNT_MAX * RECORD_SIZE_BYTES),
        MemoryTerm("ring batch in flight",
                   "TENANT_COUNT_MAX x BATCH_RECORD_COUNT_MAX x 64 B",
                   TENANT_COUNT_MAX, BATCH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES),
        MemoryTerm("chunk-table mirror per ring",
                   "TENANT_COUNT_MAX x capacity x 1 B",
                   TENANT_COUNT_MAX, table_mirror_bytes),
    ]


def describe_limits(capacity_record_count: int = CAPACITY_RECORD_COUNT_MAX) -> str:
    """The table `ringtail serve --limits` prints."""
    terms = worst_case_memory(capacity_record_count)
    lines = ["ringtail daemon limits and worst-case memory (each term at its limit):", ""]
    width = max(len(term.name) for term in terms)
    for term in terms:
        lines.append(f"  {term.name:<{width}}  {term.total_bytes / (1 << 20):>10,.1f} MiB")
        lines.append(f"      = {term.formula}")
        lines.append(f"      = {term.count:,} x {term.size_bytes:,} B")
    total = sum(term.total_bytes for term in terms)
    lines += ["", f"  {'total':<{width}}  {total / (1 << 20):>10,.1f} MiB",
              "  plus ~45 MiB for CPython and the libraries; the ring files' page cache "
              "is reclaimable.", "",
              "Each term is reached only with every connection and tenant at its limit at "
              "once.\nThe per-connection term is the largest: see docs/OPERATIONS.md, "
              "\"Sizing\"."]
    return "\n".join(lines)
