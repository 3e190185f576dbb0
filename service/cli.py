"""ringtail: a durable, multi-tenant ring log sidecar for GPU workers.

The command line is a contract (README.md lists every command).

Exit status: 0 success, 1 operational failure (rejected, damaged,
unreachable), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import os
import sys

import trio

from ringtail.ioring import RingError, SlotRecord
from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service.commandline import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE,
                                          SOCKET_ENVIRONMENT_VARIABLE,
                                          TOKEN_ENVIRONMENT_VARIABLE, CommandError, connect,
                                          open_client, print_table, progress_bar)
from ringtail.service.config import (DEFAULT_CAPACITY_RECORD_COUNT, DEFAULT_DATA_DIR,
                                     DEFAULT_SOCKET, ConfigError, ServeConfig, load_config,
                                     resolve_paths)
from ringtail.service.fleet import STREAM_NAME_DEFAULT, STREAM_REPLICAS_DEFAULT
from ringtail.service.protocol import PUBLISH_RECORD_COUNT_MAX, RECORD_INDEX_NONE, End, Gap, Records



def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """--connect HOST:PORT and its credentials (publish, tail)."""
    parser.add_argument("--connect", metavar="HOST:PORT",
                        help="a remote daemon's TCP listener instead of the Unix socket")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENVIRONMENT_VARIABLE, ""),
                        help=f"bearer token (default: ${TOKEN_ENVIRONMENT_VARIABLE})")
    parser.add_argument("--ca", help="CA certificate (PEM) to trust for the daemon's "
                                     "certificate (default: the system's)")
    parser.add_argument("--cert", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", help="the client certificate's private key (PEM)")
    parser.add_argument("--plaintext", action="store_true",
                        help="no TLS (the daemon allows it on loopback only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringtail", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"ringtail {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--data-dir", help=f"where the ring files live (default: "
                                          f"./{DEFAULT_DATA_DIR}, created mode 0700)")
    serve.add_argument("--socket", help=f"the Unix socket to listen on (default: "
                                        f"./{DEFAULT_SOCKET}, mode 0600)")
    serve.add_argument("--config", help="a TOML config file (default: none, the embedded "
                                        "single-user default; see deploy/ringtail.example.toml)")
    serve.add_argument("--sync", choices=("batch", "none"),
                       help="batch: ack after fdatasync (default); none: ack once written, "
                            "survives a killed daemon but not a power cut")
    serve.add_argument("--io", choices=("auto", "uring", "threads"),
                       help="auto: io_uring if its start-up probe passes, else the thread "
                            "backend (default); uring: io_uring or exit 1; threads: never "
                            "io_uring")
    serve.add_argument("--capacity", type=int,
                       help=f"records per tenant ring created on first use (default: "
                            f"{DEFAULT_CAPACITY_RECORD_COUNT:,})")
    serve.add_argument("--http", "--metrics", metavar="HOST:PORT", dest="http_listen",
                       help="serve the web page, /metrics, /healthz and /readyz over HTTP "
                            "there (HTTPS with tls_cert off loopback; config: http_listen, "
                            "alias metrics_listen; --metrics is an alias; port 0 picks a "
                            "free one; default: off)")
    serve.add_argument("--limits", action="store_true",
                       help="print the daemon's limits and its worst-case memory as a "
                            "formula of them, then exit")

    publish = commands.add_parser("publish", help="publish records to a tenant")
    publish.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET))
    publish.add_argument("--tenant", type=int, required=True)
    publish.add_argument("--raw", action="store_true", help="read N x 64-byte records from stdin")
    publish.add_argument("--count", type=int, default=1, help="synthetic records to publish")
    publish.add_argument("--rate", type=float, default=0.0, help="records/s (0: as fast as possible)")
    add_remote_arguments(publish)

    tail = commands.add_parser("tail", help="replay and follow a tenant's records")
    tail.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET))
    tail.add_argument("--tenant", type=int, required=True)
    tail.add_argument("--from", dest="start", default="oldest", help="oldest | latest | SEQ")
    tail.add_argument("--follow", action="store_true")
    tail.add_argument("--format", choices=("table", "json", "raw"), default="table")
    tail.add_argument("--opcode", metavar="N[,N...]",
                      help="only records with one of these opcodes (at most 64)")
    tail.add_argument("--epochs", metavar="X..Y", help="only epochs X..Y (inclusive)")
    tail.add_argument("--failure-only", action="store_true",
                      help="only records with failure evidence (status, class, code or digest)")
    tail.add_argument("--since", metavar="TIME",
                      help="start at the first record whose timestamp_ns >= TIME: ISO 8601 "
                           "(no zone: UTC) or ns since the Unix epoch; replaces --from")
    add_remote_arguments(tail)
    add_fleet_arguments(tail, required=False)

    ship = commands.add_parser("ship", help="ship tenants' records to NATS JetStream, "
                               "exactly once (docs/OPERATIONS.md, Fleet)")
    ship.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET))
    ship.add_argument("--tenant", type=int, action="append", required=True,
                      help="a tenant to ship (repeat for several)")
    ship.add_argument("--replicas", type=int, default=STREAM_REPLICAS_DEFAULT,
                      help=f"replicas of the stream if ship creates it (default: "
                           f"{STREAM_REPLICAS_DEFAULT}; use 3 on a cluster: a single-node "
                           "stream is not power-safe)")
    ship.add_argument("--metrics", metavar="HOST:PORT",
                      help="serve ship's Prometheus figures at http://HOST:PORT/metrics "
                           "(port 0 picks a free one, logged; default: off)")
    add_fleet_arguments(ship, required=True)

    token = commands.add_parser("token", help="make bearer tokens for the config")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_new = token_commands.add_parser(
        "new", help="print a new token and the config line (with its hash) to paste")
    token_new.add_argument("--tenant", type=int,
                           help="the tenant it is for (default: an admin of every tenant)")
    token_new.add_argument("--role", default="publish,subscribe",
                           help="comma-separated roles: publish, subscribe, admin")
    token_new.add_argument("--expires", help="expiry as an RFC 3339 time, e.g. "
                                             "2027-01-01T00:00:00Z")

    verify = commands.add_parser("verify", help="full checksum scan of a ring file or data dir")
    verify.add_argument("path")
    verify.add_argument("--strict", action="store_true",
                        help="also fail when a header copy is unusable (not data loss: "
                             "the other copy is in use)")
    inspect = commands.add_parser("inspect", help="header, sequences, capacity and fill")
    inspect.add_argument("path")

    import_vrrl = commands.add_parser("import-vrrl", help="publish a VRRL0001 log's records")
    import_vrrl.add_argument("file")
    import_vrrl.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET))
    import_vrrl.add_argument("--tenant", type=int)

    export_vrrl = commands.add_parser("export-vrrl", help="write a tenant's records as VRRL0001")
    export_vrrl.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET))
    export_vrrl.add_argument("--tenant", type=int, required=True)
    export_vrrl.add_argument("--out", required=True)
    export_vrrl.add_argument("--capacity", type=int)
    add_replay_parsers(commands)

    bench = commands.add_parser("bench", help="end-to-end benchmark beside Redis and the "
                                "disk's ceiling (ringtail.bench.e2e)")
    bench.add_argument("--quick", action="store_true", help="a subset, under a minute")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--write-doc", action="store_true",
                       help="rewrite the 'End to end' section of docs/BENCHMARKS.md")
    bench.add_argument("--dir", help="where to put the temporary files (not tmpfs)")
    bench.add_argument("--diff", action="store_true",
                       help="instead: diff throughput and snapshot compression "
                            "(ringtail.bench.replay)")
    bench.add_argument("--fleet", action="store_true",
                       help="instead: ringtail ship into a local JetStream (R1, R3) beside a "
                            "direct nats-py client (ringtail.bench.fleet; needs nats-server)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) and EXIT_USAGE
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as error:
        print(f"ringtail: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, RingError, OSError) as error:
        print(f"ringtail {args.command}: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _one_line(error: Exception) -> str:
    """The message without Python's "[Errno N]" prefix where ours already says it all."""
    if isinstance(error, OSError) and error.filename is None and error.strerror \
            and error.args[1:] == (error.strerror,):
        return error.strerror
    return str(error)


# -- serve ------------------------------------------------------------------------


def serve_config(args) -> ServeConfig:
    config = ServeConfig()
    if args.config:
        config = load_config(args.config, config)
    overrides = {key: value for key, value in (
        ("data_dir", args.data_dir), ("socket", args.socket), ("sync", args.sync),
        ("io", args.io), ("capacity", args.capacity),
        ("http_listen", args.http_listen)) if value is not None}
    if args.http_listen is not None:
        overrides["metrics_listen"] = ""  # the flag replaces the file's listener, alias or not
    return resolve_paths(dataclasses.replace(config, **overrides).validate())


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ringtail")
    except PackageNotFoundError:
        return "unknown (not installed)"


def command_serve(args) -> int:
    from ringtail.service.server import Daemon
    if args.limits:
        from ringtail.service.limits import describe_limits
        config = serve_config(args)
        print(describe_limits(max([config.capacity, *(tenant.capacity for tenant in
                                                       config.tenants.values())]),
                              config.connection_limits))
        return EXIT_OK
    # A native crash (SIGSEGV, SIGILL, SIGBUS, SIGABRT) prints every thread's
    # Python stack to the log before the process dies: never a silent exit.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    config = serve_config(args)
    # SIGHUP re-reads the same file with the same flags on top.
    reload_config = (lambda: serve_config(args)) if args.config else None
    trio.run(Daemon(config, reload_config=reload_config).serve)
    return EXIT_OK


def command_token(args) -> int:
    from ringtail.service.auth import ROLE_NAMES, hash_token, new_token
    roles = [role.strip() for role in args.role.split(",") if role.strip()]
    unknown = [role for role in roles if role not in ROLE_NAMES]
    if unknown or not roles:
        print(f"ringtail token new: --role {args.role!r}: use a comma-separated list of "
              f"{', '.join(ROLE_NAMES)}", file=sys.stderr)
        return EXIT_USAGE
    token = new_token()
    fields = [f'token = "{hash_token(token)}"']
    if args.tenant is not None:
        fields.append("roles = [" + ", ".join(f'"{role}"' for role in roles) + "]")
        where = f"grants = [...] of [tenants.{args.tenant}]"
    else:
        where = "admins = [...] (every role on every tenant)"
    if args.expires:
        fields.append(f"expires = {args.expires}")
    line = "{ " + ", ".join(fields) + " },"
    check = f"x = [{line.rstrip(',')}]"
    try:  # what we print must load
        import tomllib
        tomllib.loads(check)
    except ValueError as error:
        print(f"ringtail token new: --expires {args.expires!r}: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    print(f"# add this line to {where}; the config stores only the hash,", file=sys.stderr)
    print("# so keep the token above: it cannot be shown again.", file=sys.stderr)
    print(line)
    return EXIT_OK


# -- clients ----------------------------------------------------------------------


def read_stdin_records() -> bytes:
    data = sys.stdin.buffer.read()
    if len(data) % RECORD_SIZE_BYTES:
        raise CommandError(f"stdin held {len(data)} bytes, not a whole number of "
                           f"{RECORD_SIZE_BYTES}-byte records")
    return data


def split_batches(data: bytes, count_max: int = PUBLISH_RECORD_COUNT_MAX) -> list[bytes]:
    step = count_max * RECORD_SIZE_BYTES
    return [data[offset:offset + step] for offset in range(0, len(data), step)]


def synthetic_records(tenant_id: int, count: int) -> bytes:
    import time
    now = time.time_ns()
    return b"".join(SlotRecord(timestamp_ns=now + index, slot_idx=index, tenant_id=tenant_id,
                               opcode=index % 16).encode() for index in range(count))


def command_publish(args) -> int:
    from ringtail.service.client import ErrorCode, RingtailError
    data = read_stdin_records() if args.raw else synthetic_records(args.tenant, args.count)
    if not data:
        raise CommandError("nothing to publish")

    async def run():
        async with await open_client(args, args.tenant) as client:
            batches = split_batches(data)
            if args.rate > 0:
                acks = []
                per_batch = PUBLISH_RECORD_COUNT_MAX / args.rate
                for batch in batches:
                    acks.extend(await client.publish_many([batch]))
                    await trio.sleep(per_batch)  # pacing the offered load, not synchronisation
                return acks
            return await client.publish_many(batches)

    try:
        acks = trio.run(run)
    except RingtailError as error:
        if error.code == ErrorCode.CONNECTION_LOST:  # not a rejection: the daemon went away
            raise CommandError(str(error)) from error
        where = ""
        if error.batch_id and error.record_index != RECORD_INDEX_NONE:
            # The daemon names the record within its batch; the user wants the
            # input's record (batch ids count from 1, batches are split in order).
            index = (error.batch_id - 1) * PUBLISH_RECORD_COUNT_MAX + error.record_index
            where = f" (input record {index})"
        raise CommandError(f"rejected{where}: {error}") from error
    print(f"acknowledged {len(data) // RECORD_SIZE_BYTES} records: sequences "
          f"{acks[0].first_sequence}..{acks[-1].last_sequence}")
    return EXIT_OK


def parse_start(text: str) -> tuple[str, int]:
    if text in ("oldest", "latest"):
        return text, 0
    try:
        return "sequence", int(text)
    except ValueError:
        raise CommandError(f"--from {text!r}: use oldest, latest or a sequence number") from None


TABLE_COLUMNS = ("sequence", "timestamp_ns", "slot", "opcode", "args", "epoch", "status",
                 "failure", "backend", "digest")


def record_row(sequence: int, record: SlotRecord) -> tuple:
    return (sequence, record.timestamp_ns, record.slot_idx, record.opcode,
            ",".join(map(str, record.args)), record.epoch, record.slot_status,
            SlotRecord.to_json_dict(record)["failure_class"], record.backend_code,
            f"{record.output_digest:016x}")


def command_tail(args) -> int:
    from ringtail.service.client import RingtailError
    if args.nats:
        return command_fleet_tail(args)
    from ringtail.service.tail_filters import TailUsageError, parse_tail_filters
    try:
        start, value, filters = parse_tail_filters(args)
    except TailUsageError as error:
        print(f"ringtail tail: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout.buffer
    widths = (10, 20, 6, 6, 23, 6, 6, 15, 7, 16)
    if args.format == "table":
        print("  ".join(c.rjust(w) for c, w in zip(TABLE_COLUMNS, widths)), flush=True)

    async def run():
        async with await open_client(args, args.tenant) as client:
            async for event in client.subscribe(start, value, follow=args.follow, **filters):
                if isinstance(event, Gap):
                    print(f"ringtail tail: gap: sequences {event.first_lost_sequence}.."
                          f"{event.last_lost_sequence} were evicted before they were read",
                          file=sys.stderr)
                elif isinstance(event, Records):
                    write_records(event, args.format, out, widths)
                elif isinstance(event, End):
                    return

    try:
        trio.run(run)
    except RingtailError as error:
        raise CommandError(str(error)) from error
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


def write_records(event: Records, fmt: str, out, widths) -> None:
    if fmt == "raw":
        out.write(event.records)
        out.flush()
        return
    count = len(event.records) // RECORD_SIZE_BYTES
    sequences = event.sequences or range(event.first_sequence, event.first_sequence + count)
    lines = []
    for index, sequence in enumerate(sequences):
        record = SlotRecord.decode(event.records[index * 64:(index + 1) * 64])
        if fmt == "json":
            lines.append(json.dumps({"sequence": sequence, **record.to_json_dict()}))
        else:
            lines.append("  ".join(str(v).rjust(w) for v, w in zip(record_row(sequence, record), widths)))
    out.write(("\n".join(lines) + "\n").encode())
    out.flush()


# -- files ------------------------------------------------------------------------


def ring_paths(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if name.endswith(".ring"))
        if not found:
            raise CommandError(f"{path} holds no .ring files")
        return found
    return [path]


def command_inspect(args) -> int:
    from ringtail.ioring.scan import inspect_ring
    from ringtail.ioring.snapshot import is_snapshot_file
    if is_snapshot_file(args.path):
        from ringtail.service.snapshots import command_inspect_snapshot
        return command_inspect_snapshot(args)
    for index, path in enumerate(ring_paths(args.path)):
        if index:
            print()
        print_table(inspect_ring(path).rows())
    return EXIT_OK


def command_verify(args) -> int:
    """Verify every ring of a file or a data dir: one line per ring, a ring that
    cannot be opened included; exit 1 if any is damaged or unreadable (or, with
    --strict, has an unusable header copy)."""
    from ringtail.ioring.scan import verify_ring
    from ringtail.ioring.snapshot import is_snapshot_file
    if is_snapshot_file(args.path):
        from ringtail.service.snapshots import command_verify_snapshot
        return command_verify_snapshot(args)
    strict = getattr(args, "strict", False)
    paths = ring_paths(args.path)
    failed = 0
    for path in paths:
        try:
            report = verify_ring(path, progress_bar(f"verify {os.path.basename(path)}"))
        except (RingError, OSError) as error:
            print(f"{path}: UNREADABLE: {_one_line(error)}")
            failed += 1
            continue
        status = "ok" if report.ok else f"DAMAGED ({len(report.damaged)} ranges)"
        if report.header_problems:
            status += (" (header copy unusable" + (", --strict fails on it)" if strict
                                                   else "; --strict would fail)"))
        print(f"{path}: {status}: {report.verified_record_count} records verified"
              + (f", {report.evicted_during_scan} evicted during the scan"
                 if report.evicted_during_scan else ""))
        for line in report.header_problems + report.damaged:
            print(f"  {line}")
        failed += not report.ok or bool(strict and report.header_problems)
    if len(paths) > 1:
        print(f"{len(paths)} rings: {len(paths) - failed} passed, {failed} failed")
    return EXIT_FAILURE if failed else EXIT_OK


def command_import_vrrl(args) -> int:
    from ringtail.ioring.vrrl import import_vrrl
    from ringtail.service.client import ErrorCode, RingtailError
    records = import_vrrl(args.file)
    by_tenant: dict[int, list[bytes]] = {}
    for record in records:
        by_tenant.setdefault(int.from_bytes(record[16:20], "little"), []).append(record)
    skipped = 0
    if args.tenant is not None:
        skipped = sum(len(v) for k, v in by_tenant.items() if k != args.tenant)
        by_tenant = {args.tenant: by_tenant.get(args.tenant, [])}
    draw = progress_bar("import")
    total = sum(len(v) for v in by_tenant.values())

    async def run():
        done = 0
        for tenant_id, tenant_records in by_tenant.items():
            if not tenant_records:
                continue
            async with await connect(args.socket, tenant_id) as client:
                for batch in split_batches(b"".join(tenant_records)):
                    acks = await client.publish_many([batch])
                    done += len(batch) // RECORD_SIZE_BYTES
                    if draw:
                        draw(done, total)
                print(f"tenant {tenant_id}: {len(tenant_records)} records imported, "
                      f"last sequence {acks[-1].last_sequence}")

    try:
        trio.run(run)
    except RingtailError as error:
        if error.code == ErrorCode.CONNECTION_LOST:  # not a rejection: the daemon went away
            raise CommandError(str(error)) from error
        raise CommandError(f"rejected: {error}") from error
    print(f"imported {total} of {len(records)} records from {args.file}"
          + (f"; skipped {skipped} of other tenants" if args.tenant is not None else ""))
    return EXIT_OK


def command_export_vrrl(args) -> int:
    """Stream a tenant's replay into a VRRL0001 file: each Records frame is
    written to its slots as it arrives (ioring.vrrl.VrrlWriter), so memory is
    one frame and one VRRL_EXPORT_CHUNK_RECORD_COUNT_MAX piece, whatever the
    ring's size (it held one `bytes` per record: ~1.7 GiB for a full ring)."""
    from ringtail.ioring.vrrl import VRRL_CAPACITY_MAX, VrrlWriter, write_vrrl_file
    from ringtail.service.client import RingtailError

    draw = progress_bar("export")
    result: list[VrrlWriter] = []

    def fill(fd: int) -> None:
        async def run() -> None:
            async with await connect(args.socket, args.tenant) as client:
                welcome = client.welcome
                total = welcome.next_sequence - welcome.oldest_sequence
                # Without --capacity: the records retained now (at most the
                # VRRL maximum); `finish(shrink=True)` fits it to what arrived.
                writer = VrrlWriter(fd, args.capacity or max(1, min(total, VRRL_CAPACITY_MAX)))
                async for event in client.subscribe("oldest", follow=False):
                    if isinstance(event, Records):
                        writer.write(event.records)
                        if draw and total:
                            draw(min(writer.record_count, total), total)
                writer.finish(shrink=not args.capacity)
                result.append(writer)
        trio.run(run)

    try:
        write_vrrl_file(args.out, fill)
    except RingtailError as error:
        raise CommandError(str(error)) from error
    except ValueError as error:  # a capacity out of range, or a malformed record
        raise CommandError(f"{args.out} not written: {error}") from error
    writer = result[0]
    print(f"exported {min(writer.record_count, writer.capacity)} records of tenant "
          f"{args.tenant} to {args.out} (capacity {writer.capacity})")
    return EXIT_OK


def command_bench(args) -> int:
    from ringtail.bench import e2e  # shipped in the package: works from anywhere
    args.profile = None
    program = os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else "ringtail"
    if args.diff:
        from ringtail.bench import replay
        return replay.command(args, [program, *sys.argv[1:]])
    if args.fleet:
        from ringtail.bench import fleet
        return fleet.command(args, [program, *sys.argv[1:]])
    return e2e.command(args, [program, *sys.argv[1:]])


# -- fleet (NATS JetStream) ---------------------------------------------------------


def add_fleet_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--nats URL, --node NAME, --stream NAME (ship, and tail's fleet mode)."""
    parser.add_argument("--nats", metavar="URL", required=required,
                        help="NATS server URL, e.g. nats://127.0.0.1:4222" + (
                            "" if required else ": read the tenant from JetStream (fleet "
                            "tail) instead of a daemon"))
    parser.add_argument("--node", help="the node's name in the subjects ringtail.<node>.<tenant>"
                                       " (default: this host name's first label)")
    parser.add_argument("--stream", default=STREAM_NAME_DEFAULT,
                        help=f"the JetStream stream (default: {STREAM_NAME_DEFAULT})")


def command_ship(args) -> int:
    import asyncio

    from ringtail.service.fleet import FleetError, FleetErrorCode
    from ringtail.service.ship import Shipper, default_node, ship_until_signalled
    if args.replicas < 1:
        print(f"ringtail ship: --replicas {args.replicas}: use 1 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        shipper = Shipper(args.nats, args.socket, args.node or default_node(), args.tenant,
                          stream=args.stream, replicas=args.replicas)
        if args.metrics:
            from ringtail.service.config import parse_host_port
            from ringtail.service.ship import serve_metrics
            host, port = parse_host_port(args.metrics, "--metrics")
            port = serve_metrics(shipper, host, port)
            logging.getLogger("ringtail.ship").info("metrics at http://%s:%d/metrics", host,
                                                    port)
        asyncio.run(ship_until_signalled(shipper))
    except FleetError as error:
        if error.code is FleetErrorCode.BAD_NODE_NAME:
            print(f"ringtail ship: {error}", file=sys.stderr)
            return EXIT_USAGE
        raise CommandError(str(error)) from None
    return EXIT_OK


def command_fleet_tail(args) -> int:
    """`ringtail tail --nats`: a shipped tenant from JetStream. The filters apply here,
    record by record (JetStream cannot see inside a message); --since starts at the
    first record stamped at or after TIME, as the daemon's start-at-time does."""
    import asyncio

    import numpy

    from ringtail.ioring.record import RECORD_DTYPE
    from ringtail.service.fleet import KIND_GAP, FleetError, fleet_tail, print_gap
    from ringtail.service.protocol import StartKind
    from ringtail.service.subscribers import RecordFilter
    from ringtail.service.tail_filters import TailUsageError, parse_tail_filters
    if not args.node:
        print("ringtail tail: --nats needs --node NAME (the shipping node's name)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        start, value, filters = parse_tail_filters(args)
    except TailUsageError as error:
        print(f"ringtail tail: {error}", file=sys.stderr)
        return EXIT_USAGE
    since = value if start == StartKind.TIME else None
    if since is not None:
        start, value = "oldest", 0
    record_filter = RecordFilter(frozenset(filters.get("opcodes", ())),
                                 filters.get("epoch_min", 0),
                                 filters.get("epoch_max", 0xFFFF_FFFF),
                                 filters.get("failure_only", False))
    out = sys.stdout.buffer
    widths = (10, 20, 6, 6, 23, 6, 6, 15, 7, 16)
    if args.format == "table":
        print("  ".join(c.rjust(w) for c, w in zip(TABLE_COLUMNS, widths)), flush=True)
    started = [since is None]

    def emit(shipped) -> None:
        if shipped.kind == KIND_GAP:
            print_gap(shipped)
            return
        records = shipped.records
        first = 0
        if not started[0]:
            stamps = numpy.frombuffer(records, dtype=RECORD_DTYPE)["timestamp_ns"]
            at = numpy.flatnonzero(stamps >= since)
            if not len(at):
                return
            first, started[0] = int(at[0]), True
        if record_filter.passes_everything and not first:
            write_records(Records(shipped.first_sequence, records), args.format, out, widths)
            return
        selected = record_filter.select(records)
        selected = selected[selected >= first]
        if len(selected):
            rows = numpy.frombuffer(records, dtype=RECORD_DTYPE)[selected]
            sequences = tuple((selected + shipped.first_sequence).tolist())
            write_records(Records(sequences[0], rows.tobytes(), sequences), args.format, out,
                          widths)

    try:
        asyncio.run(fleet_tail(args.nats, args.node, args.tenant, emit, stream=args.stream,
                               start=str(start), start_value=value, follow=args.follow))
    except FleetError as error:
        raise CommandError(str(error)) from None
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


# -- diff, snapshot, restore (docs/REPLAY.md) ------------------------------------


def add_replay_parsers(commands) -> None:
    from ringtail.service.diff import DIFF_EPOCH_RECORD_COUNT_MAX
    diff = commands.add_parser("diff", help="the first epoch where two runs' records diverge")
    diff.add_argument("a", help="tenant:T, or a ring, VRRL0001 or snapshot file")
    diff.add_argument("b", help="tenant:T, or a ring, VRRL0001 or snapshot file")
    diff.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET),
                      help="the daemon, for tenant:T sources")
    diff.add_argument("--epochs", metavar="X..Y", help="only epochs X..Y (inclusive)")
    diff.add_argument("--ignore", default="", metavar="FIELD,...",
                      help="fields not compared (timestamp_ns and tenant_id never are, "
                           "unless --include names them)")
    diff.add_argument("--include", default="", metavar="FIELD,...",
                      help="compare timestamp_ns and/or tenant_id too")
    diff.add_argument("--strict-order", action="store_true",
                      help="records of an epoch must also arrive in the same order")
    diff.add_argument("--json", action="store_true", help="one JSON object on stdout")
    diff.add_argument("--all", action="store_true", help="every divergent epoch, not the first")
    diff.add_argument("--epoch-record-max", type=int, default=DIFF_EPOCH_RECORD_COUNT_MAX,
                      help=f"records one epoch may hold per side (default: "
                           f"{DIFF_EPOCH_RECORD_COUNT_MAX:,}; 64 bytes each)")

    snapshot = commands.add_parser("snapshot", help="a tenant's records at one cut, as one "
                                                    "checked, compressed file")
    snapshot.add_argument("--socket", default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET))
    snapshot.add_argument("--tenant", type=int, required=True)
    snapshot.add_argument("--out", required=True)

    restore = commands.add_parser("restore", help="load a snapshot into an empty tenant, "
                                                  "keeping its sequences (through the running "
                                                  "daemon, or offline)")
    restore.add_argument("file")
    restore.add_argument("--tenant", type=int, required=True)
    restore.add_argument("--socket",
                         default=os.environ.get(SOCKET_ENVIRONMENT_VARIABLE, DEFAULT_SOCKET),
                         help="the running daemon to restore through (needs the admin role "
                              "on the tenant); with no daemon there, restore offline only if "
                              "--data-dir or --offline was given")
    restore.add_argument("--token", default=os.environ.get(TOKEN_ENVIRONMENT_VARIABLE, ""),
                         help=f"bearer token for the daemon "
                              f"(default: ${TOKEN_ENVIRONMENT_VARIABLE})")
    restore.add_argument("--offline", action="store_true",
                         help="write the ring file directly (daemon stopped, or tenant not "
                              "open), even if a daemon answers at --socket")
    restore.add_argument("--data-dir", default=None,
                         help=f"offline: the daemon's data directory "
                              f"(default with --offline: ./{DEFAULT_DATA_DIR})")
    restore.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY_RECORD_COUNT,
                         help=f"offline: records the new ring holds at least (default: "
                              f"{DEFAULT_CAPACITY_RECORD_COUNT:,}, or the snapshot's count)")


def command_diff(args) -> int:
    from ringtail.service.diff_command import command_diff as run
    return run(args)


def command_snapshot(args) -> int:
    from ringtail.service.snapshots import command_snapshot as run
    return run(args)


def command_restore(args) -> int:
    from ringtail.service.snapshots import command_restore as run
    return run(args)


COMMANDS = {
    "serve": command_serve,
    "diff": command_diff,
    "snapshot": command_snapshot,
    "restore": command_restore,
    "ship": command_ship,
    "publish": command_publish,
    "tail": command_tail,
    "verify": command_verify,
    "inspect": command_inspect,
    "import-vrrl": command_import_vrrl,
    "export-vrrl": command_export_vrrl,
    "token": command_token,
    "bench": command_bench,
}


if __name__ == "__main__":
    sys.exit(main())
