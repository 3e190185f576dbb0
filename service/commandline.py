"""What every `ringtail` command shares: exit codes, the one-line CommandError,
reaching the daemon (Unix socket or TCP with TLS), and progress bars.

service/cli.py builds the parser and dispatches; the commands that live in
their own modules (diff_command.py, snapshots.py) import these from here, so
no command module imports the CLI back.
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# Client commands find the daemon here unless --socket says otherwise (the
# Kubernetes sidecar example sets it in the worker's environment).
SOCKET_ENVIRONMENT_VARIABLE = "RINGTAIL_SOCKET"
# --token's default: a token on the command line is visible in `ps`.
TOKEN_ENVIRONMENT_VARIABLE = "RINGTAIL_TOKEN"


class CommandError(Exception):
    """An operational failure to report in one line, exit status 1."""


async def connect(socket_path: str, tenant_id: int):
    """A connected Client, or a CommandError that names the socket and the fix."""
    from ringtail.service.client import Client
    try:
        return await Client.connect(socket_path, tenant_id)
    except OSError as error:  # no such file, connection refused, permission denied
        raise CommandError(
            f"cannot reach the ringtail daemon at {socket_path}: "
            f"{error.strerror or error}; is `ringtail serve` running there? "
            "(pass its socket with --socket)") from error


async def open_client(args, tenant_id: int):
    """A Client for publish/tail: over TCP with --connect, else the Unix socket."""
    if not getattr(args, "connect", None):
        return await connect(args.socket, tenant_id)
    from ringtail.service.client import Client, client_ssl_context
    from ringtail.service.config import parse_host_port
    host, port = parse_host_port(args.connect, "--connect")
    if not args.token:
        raise CommandError(f"--connect needs a token: pass --token or set "
                           f"${TOKEN_ENVIRONMENT_VARIABLE}")
    context = None
    if not args.plaintext:
        try:
            context = client_ssl_context(args.ca, args.cert, args.key)
        except (OSError, ValueError) as error:
            raise CommandError(f"cannot load the TLS files (--ca, --cert, --key): {error}") from error
    try:
        return await Client.connect_tcp(host, port, tenant_id, token=args.token,
                                        ssl_context=context, plaintext=args.plaintext)
    except OSError as error:
        raise CommandError(f"cannot reach the ringtail daemon at {args.connect}: "
                           f"{error.strerror or error}") from error


def progress_bar(label: str):
    """A progress callback that draws a bar on a terminal, and nothing otherwise."""
    if not sys.stdout.isatty():
        return None

    def draw(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        filled = int(fraction * 30)
        end = "\n" if done >= total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%}",
              end=end, file=sys.stderr, flush=True)
    return draw


def print_table(rows: list[tuple[str, str]]) -> None:
    """Key/value rows, keys padded to one column (inspect)."""
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
