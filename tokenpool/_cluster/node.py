"""A node's place in the cluster: one trio task that joins, renews its lease, keeps the
slot map, takes and gives slots up, and opens and releases the pools in them.

The rules it keeps:
- It serves a slot (routes its commands to the local pool, and the pool's actor grants
  and vouches) only while the slot is one it owns AND its lease is locally valid
  (``LocalLease``: from when the last renewal was sent, less the margin). Every pool's
  writer asks ``lease_of(name)`` on each actor batch, so the check holds for every
  transport and for the library.
- A slot it takes is served only once its pools are recovered from the store (as at a
  restart: expired leases ended at their ``expires_at``; fences continue above every
  stored one, since each new owner bumps the pool's owner epoch). Slots are recovered
  and served a few at a time (``SERVE_STEP`` pools), the lease renewed between steps
  when due: taking thousands of pools (a lone survivor takes every pool) takes longer
  than a lease, and a lease left to lapse meanwhile lost every slot, the node's own
  included, over and over (found by an outside probe at 3,000 pools).
- A slot it gives up stops being served, its pools written and released, and only
  then is released in the database: a slot moves by release, then acquire.
- When its lease is found expired (a pause, a lost database), it closes every pool
  and joins again as a new incarnation owning nothing (a standby), then takes slots
  like any joining node.
- Slots spread evenly over the live nodes (``shares``): a node under its share takes
  free slots (nobody's, or a node's whose lease expired); a node over its share gives
  slots up, at most ``GIVE_STEP`` a round, while another live node is under its share.

The actor never waits on the database: the tables are read and written by this task,
through ``Directory`` in a worker thread, on a connection of its own.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from .._errors import (
    ClusterDownError,
    InvalidArgumentError,
    MovedError,
    PoolLockedError,
    TokenPoolError,
    TryAgainError,
)
from .._log import get_logger
from .._settings import PoolSettings
from .directory import Directory, Member, Renewal, SlotMap
from .lease import LocalLease, margin
from .slots import SLOTS, balance, key_slot

if TYPE_CHECKING:
    from .._pool import Pools

log = get_logger("tokenpool.cluster")

GIVE_STEP = 1024
"""Slots a node over its share gives up per round (each released only after its pools
are written and released)."""
SERVE_STEP = 64
"""Pools recovered between two checks that the lease needs renewing (``_serve``): at a
few ms a pool, a step is well within a renewal period."""


@functools.lru_cache(maxsize=65_536)
def slot_of(name: str) -> int:
    """A pool's hash slot (cached: routing asks for it on every command)."""
    return key_slot(name)


@attrs.frozen
class ClusterSettings:
    """A node's identity and its lease's timing (checked by the CLI with their ranges)."""

    node_id: str
    address: str  # host:port clients are sent to
    validity: float = 3.0
    renew: float = 1.0


@attrs.frozen
class NodeView:
    """What ``CLUSTER NODES`` and friends show of one node."""

    id: str
    address: str
    state: str
    live: bool
    myself: bool
    ranges: tuple[tuple[int, int], ...]
    heartbeat_age: float


class ClusterNode:
    """This process as a member of the cluster. ``run`` in a nursery (``nursery.start``)."""

    def __init__(
        self,
        pools: Pools,
        settings: ClusterSettings,
        directory: Directory,
        *,
        declared: dict[str, PoolSettings] | None = None,
    ) -> None:
        self.pools = pools
        self.settings = settings
        self.id = settings.node_id
        self.directory = directory
        self.declared = dict(declared or {})
        self.lease = LocalLease(settings.validity)
        self.incarnation = 0
        self.state = "joining"
        self.owned: dict[int, int] = {}  # slots the database says are ours -> epoch
        self.serving: set[int] = set()  # owned slots whose pools are open here
        self.owners: list[str | None] = [None] * SLOTS  # the slot map (as last read)
        self.members: dict[str, Member] = {}
        self.version = -1
        self.top_epoch = 0
        self.draining = False
        self.secret = ""  # what other nodes send VIA with (AUTH tokenpool-node <secret>)
        self.renewals = 0
        self.renew_failures = 0
        self._renewed_at = -math.inf  # when the last renewal that committed was sent
        self._lock = trio.Lock()
        self._stopped = False
        self._leaving = False
        pools.lease_of = self.lease_of

    # -- what the drivers and the pools ask -------------------------------------------

    def valid(self) -> bool:
        return self.lease.valid(time.monotonic())

    def lease_of(self, name: str) -> Callable[[], bool]:
        """Whether this node may serve the pool ``name`` now: it owns the slot, serves
        it, and its lease is valid (checked on every actor batch)."""
        slot = slot_of(name)
        serving = self.serving
        lease = self.lease

        def held() -> bool:
            return slot in serving and time.monotonic() < lease.deadline

        return held

    def route(self, pool: str) -> TokenPoolError | None:
        """``None`` when this node serves ``pool`` now; else the error to answer:
        ``MOVED <slot> <host>:<port>`` to its live owner, ``TRYAGAIN`` while this node
        takes it over, ``CLUSTERDOWN`` when no live node owns it (a failover)."""
        slot = slot_of(pool)
        if slot in self.serving and time.monotonic() < self.lease.deadline:
            return None
        owner = self.owners[slot]
        if owner is not None and owner != self.id:
            member = self.members.get(owner)
            if member is not None and member.live:
                return MovedError(f"{slot} {member.address}")
        elif owner == self.id and self.valid():
            return TryAgainError(f"slot {slot} is being taken over by this node; try again")
        return ClusterDownError("Hash slot not served")

    def nodes(self) -> list[NodeView]:
        """Every member and its slots (the database's view as last read)."""
        runs: dict[str, list[tuple[int, int]]] = {}
        start = 0
        for slot in range(1, SLOTS + 1):
            if slot == SLOTS or self.owners[slot] != self.owners[start]:
                owner = self.owners[start]
                if owner is not None:
                    runs.setdefault(owner, []).append((start, slot - 1))
                start = slot
        out = []
        for member in self.members.values():
            out.append(
                NodeView(
                    member.id,
                    member.address,
                    member.state,
                    member.live,
                    member.id == self.id,
                    tuple(runs.get(member.id, ())),
                    member.heartbeat_age,
                )
            )
        return out

    def advertise(self, host: str, port: int) -> None:
        """The address clients are sent to, when ``--advertise`` did not say: the
        listening host and port (a wildcard host cannot be reached: refused)."""
        if self.settings.address:
            return
        if host in ("0.0.0.0", "::", ""):
            raise InvalidArgumentError(
                f"--host {host!r} is every address: give --advertise HOST:PORT, the"
                " address other nodes' clients reach this node at"
            )
        shown = f"[{host}]" if ":" in host else host
        self.settings = attrs.evolve(self.settings, address=f"{shown}:{port}")

    # -- the task ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, then keep the node's place until ``leave``. Raises ``PoolLockedError``
        when another live process holds this node id (past one validity of waiting)."""
        try:
            # The store process first: started on the first take instead, its start (a
            # second or more on a busy machine) ran on the lease of that take.
            await self.pools._start_link()
            await self._join(wait=self.settings.validity + 1.0)
            task_status.started()
            while not self._stopped:
                began = trio.current_time()
                async with self._lock:
                    if not self._stopped:
                        await self._round()
                await trio.sleep_until(began + self.settings.renew)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.directory.close)

    async def _db(self, fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    async def _join(self, wait: float) -> None:
        deadline = trio.current_time() + wait
        s = self.settings
        while True:
            sent = time.monotonic()
            try:
                incarnation = await self._db(self.directory.join, self.id, s.address, s.validity)
            except PoolLockedError:
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.25)
                continue
            break
        assert isinstance(incarnation, int)
        self.incarnation = incarnation
        self._renewed(sent)
        if not self.secret:
            secret = await self._db(self.directory.secret)
            assert isinstance(secret, str)
            self.secret = secret
        self.state = "live"
        self.version = -1
        if self.draining:  # joining again (the lease ran out) writes 'live': still drained
            try:
                await self._db(self.directory.set_state, self.id, incarnation, "draining")
            except TokenPoolError as error:
                log.warning("cluster_drain_state_failed", node=self.id, error=str(error))
        log.info(
            "cluster_joined",
            node=self.id,
            address=s.address,
            incarnation=incarnation,
            validity=s.validity,
            margin=round(margin(s.validity), 3),
        )

    async def _round(self) -> None:
        """One renewal, then whatever the map asks: lost slots closed, slots taken or
        given up, pools of slots owned but not yet served opened."""
        s = self.settings
        sent = time.monotonic()
        try:
            renewal = await self._db(
                self.directory.renew, self.id, self.incarnation, s.validity, self.version
            )
        except TokenPoolError as error:
            self.renew_failures += 1
            log.warning("cluster_renew_failed", node=self.id, error=str(error))
            if not self.valid() and self.serving:
                log.error("cluster_lease_ran_out", node=self.id, slots=len(self.serving))
                await self._close_all()
            return
        if renewal is None:
            log.error(
                "cluster_lease_lost",
                node=self.id,
                slots=len(self.owned),
                note="the lease expired (paused or cut off): every pool closed; joining"
                " again as a standby",
            )
            self.lease.lost()
            await self._close_all()
            await self._join(wait=s.validity + 1.0)
            return
        assert isinstance(renewal, Renewal)
        self._renewed(sent)
        self.renewals += 1
        self._learn(renewal)
        lost = self.serving - set(self.owned)
        if lost:  # never expected while the lease held; closed all the same
            await self._give(lost, release=False)
        await self._balance()
        unserved = set(self.owned) - self.serving
        if unserved and not self.draining:
            await self._serve(unserved)

    def _learn(self, renewal: Renewal) -> None:
        self.members = {m.id: m for m in renewal.members}
        if renewal.map is not None:
            self._learn_map(renewal.map)

    def _learn_map(self, slot_map: SlotMap) -> None:
        owners: list[str | None] = [None] * SLOTS
        for first, last, owner in slot_map.ranges:
            owners[first : last + 1] = [owner] * (last - first + 1)
        self.owners = owners
        self.owned = dict(slot_map.mine)
        self.version = slot_map.version
        self.top_epoch = slot_map.top_epoch

    async def _balance(self) -> None:
        if self.draining:
            if self.owned:
                await self._give(set(self.owned))
            return
        members = self.members.values()
        take, give = balance(
            self.id,
            self.owners,
            {m.id for m in members if m.live},
            [m.id for m in members if m.live and m.state == "live"],
            GIVE_STEP,
        )
        if take:
            await self._take(take)
        elif give:
            await self._give(set(give))

    async def _take(self, wanted: list[int]) -> None:
        s = self.settings
        sent = time.monotonic()
        try:
            taken = await self._db(
                self.directory.take, self.id, self.incarnation, s.validity, wanted
            )
        except TokenPoolError as error:
            log.warning("cluster_take_failed", node=self.id, error=str(error))
            return
        if taken is None:
            return  # the lease expired: the next round finds out and joins again
        assert isinstance(taken, dict)
        self._renewed(sent)
        for slot, epoch in taken.items():
            self.owned[slot] = epoch
            self.owners[slot] = self.id
            self.top_epoch = max(self.top_epoch, epoch)
        self.version = -1  # reread the map next round
        if taken:
            log.info("cluster_slots_taken", node=self.id, slots=len(taken), asked=len(wanted))
            await self._serve(set(taken))

    def _renewed(self, sent: float) -> None:
        self.lease.renewed(sent)
        self._renewed_at = max(self._renewed_at, sent)

    async def _keep_lease(self) -> bool:
        """In the middle of long work: renew the lease if a renewal is due (lease only,
        the map is read next round). False when the lease is lost, or could not be
        renewed and has run out: the work stops there, and the next round finds out."""
        if time.monotonic() - self._renewed_at < self.settings.renew:
            return True
        sent = time.monotonic()
        try:
            extended = await self._db(
                self.directory.extend, self.id, self.incarnation, self.settings.validity
            )
        except TokenPoolError as error:
            self.renew_failures += 1
            log.warning("cluster_renew_failed", node=self.id, error=str(error))
            return self.valid()
        if not extended:
            return False
        self._renewed(sent)
        self.renewals += 1
        return True

    async def _serve(self, slots: set[int]) -> None:
        """Open the pools of ``slots`` (recovered from the store), then serve them: a
        step of slots at a time, each served as soon as its pools are open, the lease
        kept between steps."""
        started = trio.current_time()
        try:
            # A pool of these slots still open here is stale (created while its slot was
            # being given up): the store has the truth, recover it from there.
            for name in self.pools.names():
                if slot_of(name) in slots:
                    await self.pools.release(name)
            link = await self.pools._start_link()
            assert link is not None
            names = [n for n in await link.list_pools() if slot_of(n) in slots]
            for name, settings in self.declared.items():
                if slot_of(name) in slots:
                    await self.pools.create(name, settings, exists_ok=True)
            by_slot: dict[int, list[str]] = {slot: [] for slot in slots}
            for name in names:
                by_slot[slot_of(name)].append(name)
            order = sorted(slots, key=lambda slot: len(by_slot[slot]))  # empty ones first
            step: list[str] = []
            ready: set[int] = set()
            for i, slot in enumerate(order):
                step += by_slot[slot]
                ready.add(slot)
                if len(step) >= SERVE_STEP or i == len(order) - 1:
                    if not await self._keep_lease():
                        return  # lost meanwhile: the next round finds out, joins again
                    await self.pools.restore_all(step)
                    self.serving |= {s for s in ready if s in self.owned}
                    step, ready = [], set()
        except TokenPoolError as error:
            log.warning("cluster_serve_failed", node=self.id, slots=len(slots), error=str(error))
            return  # tried again next round
        pools = [n for n in self.pools.names() if slot_of(n) in slots]
        log.info(
            "cluster_slots_served",
            node=self.id,
            slots=len(slots),
            pools=len(pools),
            seconds=round(trio.current_time() - started, 3),
        )

    async def _give(self, slots: set[int], *, release: bool = True) -> None:
        """Stop serving ``slots``, write and release their pools, then (``release``)
        release the slots in the database."""
        self.serving -= slots
        for name in [n for n in self.pools.names() if slot_of(n) in slots]:
            await self._keep_lease()  # renews only when due (lost: none of these is served)
            await self.pools.release(name)
        if release:
            try:
                await self._db(self.directory.release, self.id, self.incarnation, sorted(slots))
            except TokenPoolError as error:
                log.warning("cluster_release_failed", node=self.id, error=str(error))
                return  # still ours in the database: the next round gives them again
        for slot in slots:
            self.owned.pop(slot, None)
            if self.owners[slot] == self.id:
                self.owners[slot] = None
        self.version = -1
        log.info("cluster_slots_given", node=self.id, slots=len(slots))

    async def _close_all(self) -> None:
        """The lease ran out: stop serving everything and close every pool (what they
        have pending is written if the store still takes it from us, without waiting
        for it: the database may be down)."""
        self.serving.clear()
        for name in self.pools.names():
            await self.pools.release(name, wait=False)
        self.owned.clear()
        self.owners = [None if o == self.id else o for o in self.owners]
        self.version = -1

    # -- operators ----------------------------------------------------------------------

    async def drain(self) -> None:
        """Give every slot up (their pools written and released first) and take none:
        the other nodes take them over. The node stays a member (``CLUSTER DRAIN``)."""
        async with self._lock:
            if not self.draining:
                self.draining = True
                try:
                    await self._db(self.directory.set_state, self.id, self.incarnation, "draining")
                except TokenPoolError as error:
                    log.warning("cluster_drain_state_failed", node=self.id, error=str(error))
                log.info("cluster_draining", node=self.id, slots=len(self.owned))
            if self.owned:
                await self._give(set(self.owned))

    async def undrain(self) -> None:
        """Take a share of the slots again after ``drain`` (``CLUSTER UNDRAIN``): from
        its next round the node is a taker as any live node, and the nodes over their
        share give it slots, one step a round. Raises ``InvalidArgumentError`` while the
        node leaves (SIGTERM), and the store's error when the state cannot be written
        (the node then stays drained: the operator tries again)."""
        async with self._lock:
            if self._leaving:
                raise InvalidArgumentError(
                    f"node {self.id!r} is leaving the cluster (stopping): it cannot undrain"
                )
            if not self.draining:
                return
            await self._db(self.directory.set_state, self.id, self.incarnation, "live")
            self.draining = False
            log.info("cluster_undrained", node=self.id)

    async def leave(self) -> None:
        """Drain, then leave the cluster (a normal stop: SIGTERM)."""
        self._leaving = True
        await self.drain()
        async with self._lock:
            self._stopped = True
            try:
                await self._db(self.directory.leave, self.id, self.incarnation)
            except TokenPoolError as error:
                log.warning("cluster_leave_failed", node=self.id, error=str(error))
            self.state = "left"
            log.info("cluster_left", node=self.id)
