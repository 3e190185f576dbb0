"""Tenants: one ring file, one writer and one commit signal per tenant id.

The embedded default creates a tenant on first use with the default capacity.
Each tenant's records live in their own file (`tenant-<id>.ring` in the data
directory), so one tenant filling its ring never evicts another's records.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from types import MappingProxyType
from typing import Mapping

import trio

from ringtail.ioring import RingError, RingFile, RingStatistics, open_ring
from ringtail.service.auth import Grant
from ringtail.service.batcher import TenantWriter, WriterStatistics
from ringtail.service.quotas import QuotaSettings

log = logging.getLogger("ringtail.tenants")

# Tenants one daemon serves: each holds an open file, an io_uring (or a
# thread) and an eventfd, plus a 16 MiB-max chunk-table mirror.
TENANT_COUNT_MAX = 1024
TENANT_ID_MAX = 0xFFFF_FFFF
RING_FILE_PATTERN = re.compile(r"^tenant-(\d+)\.ring$")


def ring_file_name(tenant_id: int) -> str:
    return f"tenant-{tenant_id}.ring"


# Tenant ids a log line lists at most (a data dir may hold thousands of files).
LOG_ID_COUNT_MAX = 32


def _id_ranges(ids: list[int]) -> str:
    """Sorted ids as "1-5, 9, 12-40", cut after LOG_ID_COUNT_MAX ranges."""
    ranges: list[list[int]] = []
    for tenant_id in sorted(ids):
        if ranges and tenant_id == ranges[-1][1] + 1:
            ranges[-1][1] = tenant_id
        else:
            ranges.append([tenant_id, tenant_id])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:LOG_ID_COUNT_MAX])
    if len(ranges) > LOG_ID_COUNT_MAX:
        text += f", ... ({len(ranges) - LOG_ID_COUNT_MAX} more ranges)"
    return text


class UnknownTenantError(Exception):
    """The tenant does not exist and may not be created here."""


class TenantLimitError(Exception):
    """TENANT_COUNT_MAX tenants are open already."""


@dataclasses.dataclass(frozen=True, slots=True)
class TenantSettings:
    capacity: int
    sync: str = "batch"
    name: str = ""  # for logs
    grants: tuple[Grant, ...] = ()  # who may publish/subscribe (service/auth.py)
    quota: QuotaSettings = QuotaSettings()


class Tenant:
    """One tenant's ring, its writer, and the signal subscribers wait on.

    Live hand-off (issue 13): a commit's bytes (the chain the writer just
    wrote and made durable) are kept for the followers waiting at that
    moment, each takes them once with `take_commit` right after
    `wait_beyond` returns, and the last one to take them lets them go. So a
    follower at the cursor sends a new batch from memory instead of reading
    it back from the file; one that was behind reads the file as before.
    Memory: at most one chain (the ring's batch_record_count_max x 64 B) per
    tenant, while some follower woken by it has not run yet.
    """

    def __init__(self, tenant_id: int, ring: RingFile):
        self.tenant_id = tenant_id
        self.ring = ring
        self.writer = TenantWriter(ring, self._committed_batch)
        self._committed = trio.Event()
        self._waiting = 0  # followers inside wait_beyond
        # (first sequence, bytes) of the last commit, and how many of the
        # followers waiting at it have still to take it (take_commit).
        self._commit: tuple[int, bytes] | None = None
        self._commit_takers = 0

    def _committed_batch(self, first_sequence: int, data: bytes) -> None:
        self._commit = (first_sequence, data) if self._waiting else None
        self._commit_takers = self._waiting
        committed, self._committed = self._committed, trio.Event()
        committed.set()

    async def wait_beyond(self, sequence: int) -> None:
        """Return once a record at or past `sequence` is committed. A caller
        that is a follower calls take_commit(sequence) right after (no await
        in between): the commit keeps its bytes until each follower woken by
        it did."""
        self._waiting += 1
        try:
            while self.ring.next_sequence <= sequence:
                await self._committed.wait()
        finally:
            self._waiting -= 1

    def take_commit(self, sequence: int) -> bytes | None:
        """The records of the last commit if it starts at `sequence` (a follower
        that waited at the cursor), else None (read them from the file).
        They are the bytes the writer handed to the ring for that chain,
        which is durable: what a read would return, without the read."""
        commit = self._commit
        if commit is None:
            return None
        self._commit_takers -= 1
        if self._commit_takers <= 0:
            self._commit = None
        return commit[1] if commit[0] == sequence else None


@dataclasses.dataclass(frozen=True, slots=True)
class TenantStatistics:
    writer: WriterStatistics
    ring: RingStatistics


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryStatistics:
    tenants: Mapping[int, TenantStatistics]  # open tenants, by id
    unavailable: Mapping[int, str]  # tenant id -> why its ring did not open


class TenantRegistry:
    """Opens, creates and owns every tenant's ring and writer.

    Resource handling: writers run in the nursery given to `run()`; `close()`
    stops writers after their queues drain and closes every ring.
    """

    def __init__(self, data_dir: str, default: TenantSettings, io: str,
                 create_on_first_use: bool = True,
                 settings: dict[int, TenantSettings] | None = None):
        self.data_dir = data_dir
        self.default = default
        self.io = io
        self.create_on_first_use = create_on_first_use
        self.settings = dict(settings or {})
        self.tenants: dict[int, Tenant] = {}
        self.removed: set[int] = set()  # configured tenants a reload took out
        self.unavailable: dict[int, str] = {}  # tenant id -> why its ring did not open
        # Ring files open_existing() left closed: TENANT_COUNT_MAX rings were open.
        self.skipped: list[int] = []
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        # Tenant id -> set once its ring, being opened on a worker thread, is
        # open or failed (open_on_thread). Bounded by the connections at once.
        self._opening: dict[int, trio.Event] = {}

    def open_existing(self) -> None:
        """Open (recover) every configured tenant, then every other ring file in
        the data dir, up to TENANT_COUNT_MAX open rings.

        Rings past the limit are not opened: one log line names how many and
        which (`skipped`), and their tenants are refused UNKNOWN_TENANT until
        fewer rings are open at a start; the daemon serves the others.
        """
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        found = set()
        for name in os.listdir(self.data_dir):
            match = RING_FILE_PATTERN.match(name)
            if match:
                found.add(int(match.group(1)))
        # Configured tenants first: the config names what must be served.
        order = sorted(self.settings) + sorted(found - set(self.settings))
        for index, tenant_id in enumerate(order):
            if len(self.tenants) >= TENANT_COUNT_MAX:
                self.skipped = order[index:]
                log.error("%d ring files not opened: TENANT_COUNT_MAX (%d) tenants are open; "
                          "skipped tenants %s; move unused ring files out of %s or run "
                          "another daemon for them", len(self.skipped), TENANT_COUNT_MAX,
                          _id_ranges(self.skipped), self.data_dir)
                return
            try:
                self._open(tenant_id)
            except (RingError, OSError) as error:
                # One damaged or unreadable ring must not keep the other
                # tenants down: this one answers TENANT_UNAVAILABLE (and is
                # retried on each Hello) until the operator fixes it.
                self.unavailable[tenant_id] = str(error)
                log.error("tenant %d unavailable: %s", tenant_id, error)

    def _open(self, tenant_id: int) -> Tenant:
        if len(self.tenants) >= TENANT_COUNT_MAX:
            raise TenantLimitError(
                f"{TENANT_COUNT_MAX} tenants are open (TENANT_COUNT_MAX); "
                "remove unused tenants or run another daemon")
        return self._install(tenant_id, self._open_ring(tenant_id))

    def _open_ring(self, tenant_id: int) -> RingFile:
        """Open (or create) the tenant's ring with its settings; blocking, so
        on a worker thread unless the loop may wait (start-up)."""
        settings = self.settings.get(tenant_id, self.default)
        path = os.path.join(self.data_dir, ring_file_name(tenant_id))
        return open_ring(path, capacity=settings.capacity, tenant_id=tenant_id,
                         io=self.io, sync=settings.sync)

    def _install(self, tenant_id: int, ring: RingFile) -> Tenant:
        """Serve an opened ring: log its recovery, register it, start its writer."""
        log.info("tenant %d: %s; io=%s sync=%s capacity=%d", tenant_id,
                 ring.recovery_report.summary(), ring.backend, ring.sync, ring.capacity)
        if not ring.producers.slot_count:
            log.warning("tenant %d: %s is ring format version 1 (no producer slots): producers'"
                        " resent batches are stored again (at least once); to give it the"
                        " exactly-once window, snapshot the tenant and restore it into a new"
                        " file (docs/FORMAT.md, \"Version rules\")", tenant_id, ring.path)
        tenant = Tenant(tenant_id, ring)
        self.tenants[tenant_id] = tenant
        if self._nursery is not None:
            self._nursery.start_soon(tenant.writer.run)
        return tenant

    def would_create(self, tenant_id: int) -> bool:
        """True if `get(tenant_id)` would create a new ring (a tenant neither
        open, configured, unavailable nor on disk), False otherwise."""
        if tenant_id in self.tenants or tenant_id in self.settings or \
                tenant_id in self.unavailable or tenant_id in self.removed:
            return False
        if not self.create_on_first_use:
            return False
        return not os.path.exists(os.path.join(self.data_dir, ring_file_name(tenant_id)))

    def get(self, tenant_id: int, create: bool = True) -> Tenant:
        """The tenant, opened or (embedded default) created on first use.

        Raises:
            UnknownTenantError: not configured and creation is not allowed.
            TenantLimitError: too many tenants.
        """
        if tenant_id in self.removed:
            raise UnknownTenantError(
                f"tenant {tenant_id} was removed from the config by a reload; its ring file "
                "stays in the data dir; add the tenant back to serve it again")
        tenant = self.tenants.get(tenant_id)
        if tenant is not None:
            return tenant
        if tenant_id in self.skipped and len(self.tenants) >= TENANT_COUNT_MAX:
            raise TenantLimitError(
                f"tenant {tenant_id}'s ring file was not opened at start: {TENANT_COUNT_MAX} "
                "tenants are open (TENANT_COUNT_MAX); move unused ring files out of the data "
                "dir and restart, or run another daemon for it")
        known = tenant_id in self.settings or tenant_id in self.unavailable
        if not known and not (create and self.create_on_first_use):
            raise UnknownTenantError(
                f"tenant {tenant_id} is not configured on this daemon; add it to the config")
        tenant = self._open(tenant_id)
        self.unavailable.pop(tenant_id, None)
        return tenant

    def would_open(self, tenant_id: int) -> bool:
        """True if `get(tenant_id)` would open (or create) a ring now; False if
        it is open already or get() would refuse it."""
        if tenant_id in self.tenants or tenant_id in self.removed:
            return False
        if len(self.tenants) >= TENANT_COUNT_MAX:
            return False
        known = tenant_id in self.settings or tenant_id in self.unavailable
        return known or self.create_on_first_use

    async def open_on_thread(self, tenant_id: int) -> bool:
        """Open (or create) the tenant's ring on a worker thread, where get()
        would open it on the event loop: recovery reads the file and a creation
        allocates it whole and fsyncs it, milliseconds to seconds that no
        other tenant may wait for (issue 9, item 5). get() then finds it open.

        True if this call opened it; False if there was nothing to open here
        (open already, or get() would refuse it) or another call opened it.

        Raises:
            RingError, OSError: the ring cannot be opened or created (as get()
                would raise).
        """
        opening = self._opening.get(tenant_id)
        if opening is not None:  # another Hello is opening it: wait for that one
            await opening.wait()
            return False
        if not self.would_open(tenant_id):
            return False
        self._opening[tenant_id] = opening = trio.Event()
        try:
            ring = await trio.to_thread.run_sync(self._open_ring, tenant_id)
        finally:
            del self._opening[tenant_id]
            opening.set()
        if not self.would_open(tenant_id):  # a reload removed it meanwhile, or the cap filled
            ring.close()
            return False
        self._install(tenant_id, ring)
        self.unavailable.pop(tenant_id, None)
        return True

    async def replace_empty_ring(self, tenant: Tenant, first_sequence: int) -> None:
        """Give an empty tenant a new empty ring whose next sequence is
        `first_sequence` (a restore through the daemon, docs/PROTOCOL.md 4.13).

        The caller (Gate.restore) has checked that the tenant holds no records,
        has nothing queued and no one else uses it. The file work runs on
        worker threads, shielded (a ring swapped halfway would leak): the new
        ring is written and fsynced beside the old one, then the old one is
        closed and the new one renamed over it (ioring/restore.py), so the
        tenant always has a complete ring file, both empty. The same Tenant
        object gets the new ring and a new writer.

        Raises:
            RingError, OSError: the new ring cannot be written or opened; if the
                old one was closed already, the tenant is unavailable (retried
                on the next Hello, as a ring that failed to open at start).
        """
        from ringtail.ioring.restore import install_staged_ring, stage_empty_ring
        tenant_id, old = tenant.tenant_id, tenant.ring
        with trio.CancelScope(shield=True):
            staged = await trio.to_thread.run_sync(
                stage_empty_ring, old.path, old.capacity, tenant_id, first_sequence)
            tenant.writer.close()  # nothing queued: its task returns at once

            def swap() -> RingFile:
                old.close()
                install_staged_ring(staged, old.path)
                return self._open_ring(tenant_id)

            try:
                ring = await trio.to_thread.run_sync(swap)
            except (RingError, OSError) as error:
                self.tenants.pop(tenant_id, None)
                self.unavailable[tenant_id] = str(error)
                log.error("tenant %d unavailable after its ring was recreated for a restore: "
                          "%s", tenant_id, error)
                raise
        log.info("tenant %d: ring recreated empty at sequence %d for a restore", tenant_id,
                 first_sequence)
        tenant.ring = ring
        tenant.writer = TenantWriter(ring, tenant._committed_batch)
        tenant._commit = None  # the old ring's last commit (live hand-off) is gone with it
        if self._nursery is not None:
            self._nursery.start_soon(tenant.writer.run)

    def reconfigure(self, settings: dict[int, TenantSettings], default: TenantSettings,
                    create_on_first_use: bool, open_added: bool = True
                    ) -> tuple[set[int], set[int]]:
        """Apply a reloaded config: (added, removed) tenant ids.

        New tenants' rings are opened (created) now, as at start-up (with
        `open_added` False, by the caller: `open_on_threads(added)`); a
        removed tenant is refused from now on (its ring stays open until
        exit, its file stays on disk). Capacity and sync of a ring already
        open take effect at the next start.
        """
        added = set(settings) - set(self.settings)
        removed = set(self.settings) - set(settings)
        self.settings = dict(settings)
        self.default = default
        self.create_on_first_use = create_on_first_use
        self.removed = (self.removed | removed) - set(settings)
        for tenant_id in sorted(added) if open_added else ():
            if tenant_id in self.tenants:
                continue
            try:
                self._open(tenant_id)
            except (RingError, OSError, TenantLimitError) as error:
                self.unavailable[tenant_id] = str(error)
                log.error("tenant %d unavailable: %s", tenant_id, error)
        return added, removed

    async def open_on_threads(self, tenant_ids) -> None:
        """Open (create) these tenants' rings, each on a worker thread (a
        reload's added tenants); one that cannot be opened is unavailable, as
        at start-up."""
        for tenant_id in sorted(tenant_ids):
            try:
                if tenant_id not in self.tenants and len(self.tenants) >= TENANT_COUNT_MAX:
                    raise TenantLimitError(
                        f"{TENANT_COUNT_MAX} tenants are open (TENANT_COUNT_MAX); "
                        "remove unused tenants or run another daemon")
                await self.open_on_thread(tenant_id)
            except (RingError, OSError, TenantLimitError) as error:
                self.unavailable[tenant_id] = str(error)
                log.error("tenant %d unavailable: %s", tenant_id, error)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run every writer until `close()`; then close the rings."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for tenant in self.tenants.values():
                    nursery.start_soon(tenant.writer.run)
                nursery.start_soon(self._closing.wait)  # keeps the nursery open
                task_status.started()
        finally:
            self._nursery = None
            for tenant in self.tenants.values():
                tenant.ring.close()

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            MappingProxyType({tenant_id: TenantStatistics(tenant.writer.statistics(),
                                                          tenant.ring.statistics())
                              for tenant_id, tenant in self.tenants.items()}),
            MappingProxyType(dict(self.unavailable)))

    def close(self) -> None:
        """Ask every writer to finish its queue and stop."""
        self._closing.set()
        for tenant in self.tenants.values():
            tenant.writer.close()
