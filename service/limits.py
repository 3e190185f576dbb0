"""The daemon's limits that span modules, how they relate, and what they cost.

Each limit is defined once, beside the code it bounds (the owner's comment
says why and what it costs); this module imports them, asserts at import how
they relate (by reference, never by copied literals), and states the daemon's
worst-case memory as a formula of them. `ringtail serve --limits` prints it;
docs/OPERATIONS.md ("Sizing") explains it.
"""

from __future__ import annotations

import ctypes
import dataclasses

from ringtail.ioring.format import (BATCH_RECORD_COUNT_MAX, CAPACITY_RECORD_COUNT_MAX,
                                    CHUNK_RECORD_COUNT, PRODUCER_SLOT_COUNT)
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.batcher import PENDING_RECORD_COUNT_MAX
from ringtail.service.connection import (CONNECTION_UNACKED_BATCH_COUNT_MAX,
                                         CONNECTION_UNACKED_SIZE_BYTES_MAX, HANDSHAKE_TIMEOUT_S,
                                         RECEIVE_SIZE_BYTES, REPLY_COALESCE_COUNT_MAX)
from ringtail.service.gate import (CONNECTION_COUNT_MAX, CONNECTION_LIMIT_CEILINGS,
                                   PEER_TENANT_CREATION_COUNT_MAX, REFUSAL_COUNT_MAX,
                                   SUBSCRIBER_COUNT_MAX, TCP_CONNECTION_COUNT_MAX,
                                   TENANT_LISTENER_SHARE_DIVISOR, UNIX_CONNECTION_COUNT_MAX,
                                   ConnectionLimits)
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
# The listeners' caps make up the daemon's; a tenant never holds all of one.
assert UNIX_CONNECTION_COUNT_MAX + TCP_CONNECTION_COUNT_MAX == CONNECTION_COUNT_MAX
assert TCP_CONNECTION_COUNT_MAX // TENANT_LISTENER_SHARE_DIVISOR < TCP_CONNECTION_COUNT_MAX
# A connection's unanswered bytes hold whole publish batches, more than one.
assert CONNECTION_UNACKED_SIZE_BYTES_MAX >= 2 * PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
# One peer creates at most a share of the daemon's tenants.
assert PEER_TENANT_CREATION_COUNT_MAX < TENANT_COUNT_MAX


# -- worst-case memory -------------------------------------------------------------

_PUBLISH_BATCH_SIZE_BYTES = PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
_RECORDS_FRAME_SIZE_BYTES = 12 + RECORDS_FRAME_RECORD_COUNT_MAX * (8 + RECORD_SIZE_BYTES)
# The daemon with no connection and no tenant: CPython, Trio, the libraries
# (measured idle RSS ~48 MiB on CPython 3.11) and the small blocks the
# allocators (pymalloc, glibc) keep for reuse once a load has come and gone:
# measured ~40 MiB after 64 publishers that never read their acks left (the
# same after three such rounds: reused, not leaked), ~80 MiB after 128.
DAEMON_BASE_SIZE_BYTES = 128 << 20
# One connection's own objects beyond its buffers: its tasks, stream, codec
# state and, on TCP, OpenSSL's state and buffers (measured RSS: ~51 KiB for a
# TLS connection waiting in its handshake, ~12 KiB for a welcomed idle Unix
# one; the rest is room for OpenSSL's record buffers once data flows).
CONNECTION_OBJECTS_SIZE_BYTES = 128 << 10
# glibc malloc: allocations from this size up are mmapped, so a freed publish
# batch (256 KiB) or receive buffer goes back to the system at once, instead
# of staying in the heap after its connection left (glibc's default threshold
# grows with the largest block freed, up to 32 MiB, and then keeps them).
MALLOC_MMAP_THRESHOLD_BYTES = 128 << 10
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>

assert MALLOC_MMAP_THRESHOLD_BYTES < _PUBLISH_BATCH_SIZE_BYTES


def return_freed_buffers_promptly() -> bool:
    """Fix glibc's mmap threshold at MALLOC_MMAP_THRESHOLD_BYTES (the daemon
    calls it once at start). False where the C library has no mallopt (musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) == 1


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryTerm:
    name: str
    formula: str
    count: int  # how many of it at most
    size_bytes: int  # each

    @property
    def total_bytes(self) -> int:
        return self.count * self.size_bytes


def connection_size_bytes() -> int:
    """What one connection may hold at most: its receive buffer, its objects,
    and either its unanswered publish records plus the one batch parsed and
    waiting for room, or a replay read plus the Records frame being sent."""
    publishing = CONNECTION_UNACKED_SIZE_BYTES_MAX + _PUBLISH_BATCH_SIZE_BYTES
    subscribing = REPLAY_READ_RECORD_COUNT_MAX * RECORD_SIZE_BYTES + _RECORDS_FRAME_SIZE_BYTES
    return RECEIVE_BUFFER_BYTES_MAX + CONNECTION_OBJECTS_SIZE_BYTES + max(publishing, subscribing)


# A ring's producer window in memory (ioring/producers.py keeps each slot's
# acks packed as on disk): ~680 B per full slot measured with tracemalloc
# (64 slots x 16 acks: 43 KiB); bounded here at 1 KiB per slot.
PRODUCER_TABLE_SIZE_BYTES = PRODUCER_SLOT_COUNT * 1024


def tenant_size_bytes(capacity_record_count: int) -> int:
    """What one open tenant may hold at most: records waiting for its writer,
    the batch in flight and the last one committed (held until its live
    followers took it: service/subscribers.py), its chunk-table mirror
    (capacity bytes) and its producer window."""
    return (PENDING_RECORD_COUNT_MAX + 2 * BATCH_RECORD_COUNT_MAX) * RECORD_SIZE_BYTES + \
        capacity_record_count + PRODUCER_TABLE_SIZE_BYTES


def memory_bound_bytes(connection_count: int, tenant_count: int,
                       capacity_record_count: int) -> int:
    """The worst-case formula for given counts (the test holds a daemon to it):
    DAEMON_BASE_SIZE_BYTES + connections x connection_size_bytes() +
    tenants x tenant_size_bytes(capacity)."""
    return (DAEMON_BASE_SIZE_BYTES + connection_count * connection_size_bytes() +
            tenant_count * tenant_size_bytes(capacity_record_count))


def worst_case_memory(capacity_record_count: int = CAPACITY_RECORD_COUNT_MAX,
                      limits: ConnectionLimits | None = None) -> list[MemoryTerm]:
    """The daemon's memory at its limits, term by term; their sum is
    memory_bound_bytes(every connection, TENANT_COUNT_MAX, capacity).

    `capacity_record_count`: the largest ring capacity in use (each open ring
    keeps an in-memory mirror of its chunk table: capacity bytes, docs/FORMAT.md).
    `limits`: the configured connection limits (default: the constants).
    """
    limits = limits or ConnectionLimits()
    connections = limits.unix_connections_max + limits.tcp_connections_max
    # A connection either publishes or subscribes (docs/PROTOCOL.md, state
    # table), so its output side holds the larger of the two, never both.
    publishing_bytes = CONNECTION_UNACKED_SIZE_BYTES_MAX + _PUBLISH_BATCH_SIZE_BYTES
    subscribing_bytes = REPLAY_READ_RECORD_COUNT_MAX * RECORD_SIZE_BYTES + _RECORDS_FRAME_SIZE_BYTES
    count = "(unix_connections_max + tcp_connections_max)"
    return [
        MemoryTerm("the daemon itself", "DAEMON_BASE_SIZE_BYTES", 1, DAEMON_BASE_SIZE_BYTES),
        MemoryTerm("connection receive buffer", f"{count} x RECEIVE_BUFFER_BYTES_MAX",
                   connections, RECEIVE_BUFFER_BYTES_MAX),
        MemoryTerm("connection objects (tasks, stream, TLS)",
                   f"{count} x CONNECTION_OBJECTS_SIZE_BYTES",
                   connections, CONNECTION_OBJECTS_SIZE_BYTES),
        MemoryTerm("publish records unanswered, or a replay read",
                   f"{count} x max(CONNECTION_UNACKED_SIZE_BYTES_MAX + one publish batch "
                   "(PUBLISH_RECORD_COUNT_MAX x 64 B), REPLAY_READ_RECORD_COUNT_MAX x 64 B + "
                   "one Records frame)",
                   connections, max(publishing_bytes, subscribing_bytes)),
        MemoryTerm("records waiting for a tenant's writer",
                   "TENANT_COUNT_MAX x PENDING_RECORD_COUNT_MAX x 64 B",
                   TENANT_COUNT_MAX, PENDING_RECORD_COUNT_MAX * RECORD_SIZE_BYTES),
        MemoryTerm("ring batch in flight, and the last one committed (live followers)",
                   "TENANT_COUNT_MAX x 2 x BATCH_RECORD_COUNT_MAX x 64 B",
                   TENANT_COUNT_MAX, 2 * BATCH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES),
        MemoryTerm("chunk-table mirror per ring",
                   "TENANT_COUNT_MAX x capacity x 1 B",
                   TENANT_COUNT_MAX, capacity_record_count),
        MemoryTerm("producer window per ring (exactly-once)",
                   "TENANT_COUNT_MAX x PRODUCER_TABLE_SIZE_BYTES",
                   TENANT_COUNT_MAX, PRODUCER_TABLE_SIZE_BYTES),
    ]


def describe_limits(capacity_record_count: int = CAPACITY_RECORD_COUNT_MAX,
                    limits: ConnectionLimits | None = None) -> str:
    """The text `ringtail serve --limits` prints: the connection limits in
    force, then the worst-case memory term by term."""
    limits = limits or ConnectionLimits()
    lines = ["ringtail daemon limits (a config may lower each, never raise it):", ""]
    for key, (ceiling, name) in CONNECTION_LIMIT_CEILINGS.items():
        lines.append(f"  {key:<26} {getattr(limits, key):>8g}   (built-in {name} = {ceiling:g})")
    lines += [f"  {'per tenant, per listener':<26} {'1/' + str(TENANT_LISTENER_SHARE_DIVISOR):>8}   "
              "of the listener's cap (TENANT_LISTENER_SHARE_DIVISOR), and its connections_max",
              f"  {'handshake timeout':<26} {HANDSHAKE_TIMEOUT_S:>8g}   seconds from accept to "
              "Hello, TLS included (HANDSHAKE_TIMEOUT_S)",
              f"  {'refusals answered at once':<26} {REFUSAL_COUNT_MAX:>8}   per listener; "
              "more are closed unanswered (REFUSAL_COUNT_MAX)",
              f"  {'unanswered per connection':<26} {CONNECTION_UNACKED_SIZE_BYTES_MAX:>8}   bytes "
              f"(CONNECTION_UNACKED_SIZE_BYTES_MAX), {CONNECTION_UNACKED_BATCH_COUNT_MAX} batches",
              f"  {'tenants':<26} {TENANT_COUNT_MAX:>8}   open rings (TENANT_COUNT_MAX)", "",
              "Worst-case memory (each term at its limit):", ""]
    terms = worst_case_memory(capacity_record_count, limits)
    width = max(len(term.name) for term in terms)
    for term in terms:
        lines.append(f"  {term.name:<{width}}  {term.total_bytes / (1 << 20):>10,.1f} MiB")
        lines.append(f"      = {term.formula}")
        lines.append(f"      = {term.count:,} x {term.size_bytes:,} B")
    total = sum(term.total_bytes for term in terms)
    lines += ["", f"  {'total':<{width}}  {total / (1 << 20):>10,.1f} MiB",
              "  The ring files' page cache comes on top; it is reclaimable.", "",
              "Each term is reached only with every connection and tenant at its limit at "
              "once.\nThe receive buffers are the largest term: see docs/OPERATIONS.md, "
              "\"Sizing\"."]
    return "\n".join(lines)
