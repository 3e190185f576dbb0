"""The protocol's version, size limits and flag bits, with the relations between them.

Config may lower a limit (Welcome.publish_record_count_max), never raise it.
docs/PROTOCOL.md section 7 lists the same numbers for people writing a peer.
"""

from __future__ import annotations

from ringtail.ioring.record import RECORD_SIZE_BYTES

# The version this side sends in Hello and Welcome; a server answers a Hello of
# any version in PROTOCOL_VERSIONS_SPOKEN with a Welcome of the same version.
# Version 2 added the producer id (Hello flag PRODUCER) and the producer
# sequence (Publish flag SEQUENCED): docs/PROTOCOL.md section 4.12.
PROTOCOL_VERSION = 2
PROTOCOL_VERSIONS_SPOKEN = (1, 2)
FRAME_HEADER_SIZE_BYTES = 8

# Largest payload of one frame (bytes). The largest legal frames are a full
# Publish (262,152 B) and a full sparse Records frame (294,924 B); the headroom
# lets an over-count Publish (up to 16,383 records) be read whole and refused
# with the non-fatal BATCH_TOO_LARGE instead of closing the connection.
# Memory cost: one partial frame per connection, so up to 1 MiB each.
FRAME_SIZE_BYTES_MAX = 1 << 20
# Records in one Publish: 256 KiB of records, one group-commit sized write that
# an Ack covers with a single sequence range.
PUBLISH_RECORD_COUNT_MAX = 4096
# Records in one Records frame: 256 KiB (dense) / 288 KiB (sparse) per frame
# bounds what a subscriber's client must hold to decode one frame.
RECORDS_FRAME_RECORD_COUNT_MAX = 4096
# Unparsed input one Connection holds (bytes): one partial frame (8 + 1 MiB - 1)
# plus up to ~1 MiB of one socket read. The glue drains next_event() to
# NEED_DATA between reads. Memory cost: 2 MiB per connection at worst.
RECEIVE_BUFFER_BYTES_MAX = 2 * FRAME_SIZE_BYTES_MAX
# Bytes one socket read asks for, on every side (daemon, Client, Publisher):
# a full publish batch in one read, and, with one partial frame, within
# RECEIVE_BUFFER_BYTES_MAX (asserted below).
RECEIVE_SIZE_BYTES = 256 * 1024
# Hello.token (bytes): a bearer token; 256 B fits any sane token, hashed server-side.
TOKEN_SIZE_BYTES_MAX = 256
# Hello.client_name and Welcome.server_name (UTF-8 bytes): enough for a host
# name plus a process tag in logs and metrics labels.
NAME_SIZE_BYTES_MAX = 64
# Error.message (UTF-8 bytes): one explanatory sentence with the bad value.
ERROR_MESSAGE_SIZE_BYTES_MAX = 1024
# Subscribe.opcodes: the filter is a set lookup per record; 64 opcodes costs
# 256 B on the wire and a tiny frozenset per subscriber.
SUBSCRIBE_OPCODE_COUNT_MAX = 64
# Error.record_index when no single record is at fault.
RECORD_INDEX_NONE = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1

# Flag bits (frame header u16 flags); every other bit must be 0.
RECORDS_FLAG_SPARSE = 0x0001
SUBSCRIBE_FLAG_FOLLOW = 0x0001
SUBSCRIBE_FLAG_FAILURE_ONLY = 0x0002
# Version 2: the Hello carries a u64 producer id after client_name; every
# Publish of that connection carries a u64 producer_sequence after batch_id.
HELLO_FLAG_PRODUCER = 0x0001
PUBLISH_FLAG_SEQUENCED = 0x0001
PRODUCER_ID_SIZE_BYTES = 8

# Payload sizes the limits above imply (the layouts are in _frames.py, which
# asserts its structs against these).
HELLO_SIZE_MIN = 2 + 4 + 2 + 2
WELCOME_SIZE_MIN = 2 + 4 + 4 + 8 + 8 + 8 + 2
SUBSCRIBE_SIZE_MIN = 1 + 8 + 4 + 4 + 2
ERROR_SIZE_MIN = 2 + 8 + 4 + 2
PUBLISH_SIZE_MAX = 8 + 8 + PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES  # sequenced
HELLO_SIZE_MAX = HELLO_SIZE_MIN + TOKEN_SIZE_BYTES_MAX + NAME_SIZE_BYTES_MAX + PRODUCER_ID_SIZE_BYTES
RECORDS_SIZE_MAX = 12 + RECORDS_FRAME_RECORD_COUNT_MAX * (8 + RECORD_SIZE_BYTES)

assert RECEIVE_SIZE_BYTES + 8 + FRAME_SIZE_BYTES_MAX <= RECEIVE_BUFFER_BYTES_MAX
assert PUBLISH_SIZE_MAX <= FRAME_SIZE_BYTES_MAX, "a full publish must fit a frame"
assert RECORDS_SIZE_MAX <= FRAME_SIZE_BYTES_MAX, "a full sparse records frame must fit"
assert HELLO_SIZE_MAX <= FRAME_SIZE_BYTES_MAX
assert PROTOCOL_VERSION == max(PROTOCOL_VERSIONS_SPOKEN)
assert ERROR_SIZE_MIN + ERROR_MESSAGE_SIZE_BYTES_MAX <= FRAME_SIZE_BYTES_MAX
assert FRAME_HEADER_SIZE_BYTES + FRAME_SIZE_BYTES_MAX <= RECEIVE_BUFFER_BYTES_MAX
assert FRAME_SIZE_BYTES_MAX < 1 << 32 and ERROR_MESSAGE_SIZE_BYTES_MAX < 1 << 16
assert PUBLISH_RECORD_COUNT_MAX < RECORD_INDEX_NONE
