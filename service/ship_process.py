"""`ringtail ship` under `ringtail serve`, from the config's `[ship]` table.

::

    [ship]
    nats = "nats://nats1:4222,nats://nats2:4222"   # required
    tenants = [7, 8]                               # required: the tenants to ship
    node = "gpu1"              # default: this host name's first label
    stream = "RINGTAIL"        # default
    replicas = 3               # if ship creates the stream; default 1
    metrics_listen = "127.0.0.1:9465"   # ship's own /metrics; default: off

The daemon runs ship as a child process (the same `ringtail ship` an operator
would run, on the daemon's socket) once it is ready, restarts it with capped
backoff when it exits, and stops it (SIGTERM) when the daemon stops. A child
process keeps ship's asyncio loop (nats-py) out of the daemon's Trio loop and
a fault in ship out of the daemon. `[ship]` is read at start; a reload does
not change it (restart the daemon).
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import trio

from ringtail.service.fleet import STREAM_NAME_DEFAULT, STREAM_REPLICAS_DEFAULT

log = logging.getLogger("ringtail.ship")

# Seconds between restarts of an exited ship child: doubles from the minimum
# up to the cap; back to the minimum after a child that ran SHIP_STABLE_S.
SHIP_RESTART_DELAY_MIN_S = 1.0
SHIP_RESTART_DELAY_MAX_S = 60.0
SHIP_STABLE_S = 60.0
# Seconds a stopping daemon gives ship to finish after SIGTERM before SIGKILL.
SHIP_STOP_TIMEOUT_S = 10.0

assert 0 < SHIP_RESTART_DELAY_MIN_S <= SHIP_RESTART_DELAY_MAX_S


class ShipConfigError(ValueError):
    """A bad `[ship]` table (the config loader reports it with the file's name)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ShipSettings:
    nats: str
    tenants: tuple[int, ...]
    node: str = ""
    stream: str = STREAM_NAME_DEFAULT
    replicas: int = STREAM_REPLICAS_DEFAULT
    metrics_listen: str = ""

    def argv(self, socket_path: str) -> list[str]:
        """The `ringtail ship` command line for these settings and the daemon's socket."""
        argv = [sys.executable, "-m", "ringtail.service.cli", "ship", "--nats", self.nats,
                "--socket", socket_path, "--stream", self.stream,
                "--replicas", str(self.replicas)]
        for tenant_id in self.tenants:
            argv += ["--tenant", str(tenant_id)]
        if self.node:
            argv += ["--node", self.node]
        if self.metrics_listen:
            argv += ["--metrics", self.metrics_listen]
        return argv


_KEYS = {"nats": str, "tenants": list, "node": str, "stream": str, "replicas": int,
         "metrics_listen": str}


def ship_settings(table: object) -> ShipSettings:
    """The `[ship]` table as ShipSettings.

    Raises:
        ShipConfigError: what is wrong, and what to write instead.
    """
    from ringtail.service.fleet import FleetError, check_node_name
    if not isinstance(table, dict):
        raise ShipConfigError("[ship] must be a table")
    for key, value in table.items():
        kind = _KEYS.get(key)
        if kind is None:
            raise ShipConfigError(f"[ship] has no key {key!r}; known: {', '.join(sorted(_KEYS))}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ShipConfigError(f"ship.{key} = {value!r} must be a {kind.__name__}")
    if not table.get("nats"):
        raise ShipConfigError('[ship] needs nats = "nats://HOST:PORT" (the JetStream servers)')
    tenants = table.get("tenants")
    if not tenants or not all(isinstance(t, int) and not isinstance(t, bool)
                              and 0 <= t <= 0xFFFF_FFFF for t in tenants):
        raise ShipConfigError(f"ship.tenants = {tenants!r}: list the tenant ids to ship, "
                              "e.g. tenants = [7, 8]")
    if table.get("replicas", 1) < 1:
        raise ShipConfigError(f"ship.replicas = {table['replicas']}: use 1 or more")
    if table.get("node"):
        try:
            check_node_name(table["node"])
        except FleetError as error:
            raise ShipConfigError(f"ship.node: {error.message}") from None
    return ShipSettings(table["nats"], tuple(tenants), table.get("node", ""),
                        table.get("stream", STREAM_NAME_DEFAULT),
                        table.get("replicas", STREAM_REPLICAS_DEFAULT),
                        table.get("metrics_listen", ""))


async def supervise_ship(settings: ShipSettings, socket_path: str) -> None:
    """Run `ringtail ship` as a child until cancelled, restarting it when it exits."""
    delay = SHIP_RESTART_DELAY_MIN_S
    argv = settings.argv(socket_path)
    while True:
        started = trio.current_time()
        log.info("starting ship for tenants %s to %s", list(settings.tenants), settings.nats)
        process = await trio.run_process(argv, check=False, stdin=b"",
                                         deliver_cancel=_terminate_then_kill)
        if trio.current_time() - started >= SHIP_STABLE_S:
            delay = SHIP_RESTART_DELAY_MIN_S
        log.warning("ship exited with status %s; restarting it in %.0f s (its log lines above "
                    "say why)", process.returncode, delay)
        await trio.sleep(delay)
        delay = min(2 * delay, SHIP_RESTART_DELAY_MAX_S)


async def _terminate_then_kill(process: trio.Process) -> None:
    process.terminate()
    with trio.move_on_after(SHIP_STOP_TIMEOUT_S):
        await process.wait()
        return
    log.warning("ship did not stop within %.0f s of SIGTERM; killing it", SHIP_STOP_TIMEOUT_S)
    process.kill()
