"""`ringtail tail`'s filters: the protocol's Subscribe options from the command line.

--opcode N[,N...], --epochs X..Y, --failure-only and --since TIME map onto
Subscribe's opcodes, epoch_min/epoch_max, FAILURE_ONLY and start TIME
(docs/PROTOCOL.md 4.5); the daemon filters, so only matching records cross
the socket. The same options serve the Unix socket and --connect.
"""

from __future__ import annotations

import datetime

from ringtail.service.protocol import SUBSCRIBE_OPCODE_COUNT_MAX, StartKind

U32_MAX = 0xFFFF_FFFF
U64_MAX = (1 << 64) - 1


class TailUsageError(ValueError):
    """A filter option that cannot be used (exit status 2)."""


def parse_opcodes(text: str) -> frozenset[int]:
    try:
        opcodes = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TailUsageError(f"--opcode {text!r}: use comma-separated opcode numbers, "
                             "e.g. --opcode 3,7") from None
    if not opcodes or any(not 0 <= opcode <= U32_MAX for opcode in opcodes):
        raise TailUsageError(f"--opcode {text!r}: opcodes are u32 numbers (0..{U32_MAX})")
    if len(opcodes) > SUBSCRIBE_OPCODE_COUNT_MAX:
        raise TailUsageError(f"--opcode names {len(opcodes)} opcodes, more than the protocol's "
                             f"SUBSCRIBE_OPCODE_COUNT_MAX ({SUBSCRIBE_OPCODE_COUNT_MAX}); "
                             "filter the rest with --format json and a tool")
    return opcodes


def parse_epochs(text: str) -> tuple[int, int]:
    """'X..Y' inclusive; 'X..' and '..Y' leave one end open; 'X' alone is one epoch."""
    low, separator, high = text.partition("..")
    try:
        epoch_min = int(low) if low.strip() else 0
        epoch_max = (int(high) if high.strip() else U32_MAX) if separator else epoch_min
    except ValueError:
        raise TailUsageError(f"--epochs {text!r}: use X..Y (inclusive), X.. or ..Y") from None
    if not 0 <= epoch_min <= epoch_max <= U32_MAX:
        raise TailUsageError(f"--epochs {text!r}: epochs are u32 and X must not exceed Y")
    return epoch_min, epoch_max


def parse_since(text: str) -> int:
    """ns since the Unix epoch, from an integer or an ISO 8601 time (no zone: UTC)."""
    if text.strip().isdigit():
        value = int(text)
    else:
        try:
            moment = datetime.datetime.fromisoformat(text.strip())
        except ValueError:
            raise TailUsageError(f"--since {text!r}: use an ISO 8601 time such as "
                                 "2026-12-01T10:00:00Z, or ns since the Unix epoch") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        delta = moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        value = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 \
            + delta.microseconds * 1_000
    if not 0 <= value <= U64_MAX:
        raise TailUsageError(f"--since {text!r} is before 1970 or past the u64 range")
    return value


def parse_tail_filters(args) -> tuple[StartKind | str, int, dict]:
    """(start, start_value, keyword filters for Client.subscribe) from tail's options."""
    filters: dict = {}
    if args.opcode:
        filters["opcodes"] = parse_opcodes(args.opcode)
    if args.epochs:
        filters["epoch_min"], filters["epoch_max"] = parse_epochs(args.epochs)
    if args.failure_only:
        filters["failure_only"] = True
    if args.since is not None:
        if args.start != "oldest":
            raise TailUsageError("--since and --from both say where to start: give one")
        return StartKind.TIME, parse_since(args.since), filters
    if args.start in ("oldest", "latest"):
        return args.start, 0, filters
    try:
        return "sequence", int(args.start), filters
    except ValueError:
        raise TailUsageError(f"--from {args.start!r}: use oldest, latest or a sequence "
                             "number") from None
