"""Checking what every client of a cluster saw, per pool, across the pool's owners.

In a cluster (issue 20) a pool is served by one node at a time, and each node that
opens it (a takeover, a slot moved, a restart) bumps the pool's owner epoch and
numbers its changes from ``epoch << 40``. ``checker.py`` replays one server's history;
this module replays each pool's history across all its owners, with the same
reference model, from the union of every client's observations on every node.

Per pool, the rules it holds the cluster to:

1. Revision order respects real time across owners (``checker.py``'s rule 1), and a
   grant invoked after another grant of the pool was acknowledged has a higher fence
   ("fence went back" otherwise): fences strictly increase, whichever node granted.
2. Each epoch is replayed from what the store held when its owner opened the pool:
   the model is re-seeded at each takeover with the stored leases granted before the
   epoch and not ended before it, the other tokens free in creation order (the order
   recovery restores them in).
3. Up to the epoch's frontier in the store (the newest revision of the epoch a stored
   row carries: a grant its fence, an end the revision that ended it) every revision
   is replayed, and the rows at it must be exactly what that change made: the lease
   granted, the lease it evicted, the lease a release ended. A revision no reply
   carries is explained by the rows at it and a call whose outcome its client never
   learnt (a lost call) that can have made it: a grant to that user or a release of
   that token, sent before it. A call the client may have sent twice (RedisCluster and
   the client library retry) counts as its answered send plus one lost send inside
   the call's own window. A revision nothing explains is an anomaly.
4. Above the frontier are the epoch's changes the store never got. An acknowledged
   one there is a lost change, unless the durability is ``async`` and the epoch's
   owner was killed or paused while it held the pool (``lossy``): then it is the
   documented window's loss, counted and named (with its age at the fault). The
   replay goes on above the frontier while each revision is a reply's, or a lease
   some reply names; past the first revision nothing explains (a lost call that left
   no row and no reply), the rest of the epoch cannot be replayed and its replies are
   counted as unverifiable, not flagged. The next epoch starts again from the store.
5. Reads and refusals equal the model's answer at some state inside their real-time
   window (``checker.py``'s rule 3), the re-seeded states included, so an owner that
   vouches for a lease after another node took the pool over and ended it is caught.
   A read whose window reaches an unreplayable tail, or the last moments of an owner
   that was killed or paused holding the pool, and that no replayed state explains,
   is counted as unverifiable: reads are answered from memory, in ``sync`` too (so
   they keep working while the store is down), and may show a change the dying owner
   applied and never committed, which no reply and no row records.
6. From the tables alone: per token the stored leases never overlap (no two holders,
   across owners), and per pool the fences grow with the grants' start times.

What an ``async`` loss leaves uncheckable: what the lost calls did above the frontier
(their effect is in no row and no reply), so the old owner's replies after the first
such call; and whether the lost tail, had it been kept, would have explained them.
What the new owner does is checked in full, from the state the store held. In ``sync``
durability no acknowledged change may be lost: each must be at or below its frontier.

The reference model does not model time: the runs give leases 600 s, and none expires.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import attrs

from tokenpool._model import Lease
from tokenpool._store import EPOCH_SHIFT

from .checker import (
    EPOCH,
    Anomaly,
    StoredLease,
    _apply,
    _Ids,
    _Model,
    _noop,
    _read_answer,
    _read_reply,
)
from .history import Operation

MUTATING = ("activate", "release")
DEFINITE_ERRORS = ("NOTACTIVE", "NOTHOLDER")  # refusals: the call changed nothing


@attrs.define
class Report:
    operations: int = 0
    mutations: int = 0  # changes replayed from replies
    reads: int = 0  # reads and refusals checked
    lost: int = 0  # calls whose outcome the client never learnt
    resends: int = 0  # answered calls the client may have sent twice (one more send each)
    lost_applied: int = 0  # of those sends, how many the store or a reply shows took effect
    takeovers: int = 0  # owner epochs after a pool's first, over all pools
    window_lost: list[str] = attrs.Factory(list)  # acknowledged, lost in a lossy window
    window_ages: list[float] = attrs.Factory(list)  # seconds from acknowledgement to fault
    unverifiable: int = 0  # replies past an unexplained revision of a lost tail
    anomalies: list[Anomaly] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not self.anomalies


def check(
    history: Iterable[Operation],
    *,
    tokens: dict[str, list[str]],
    start: dict[str, int],
    stored: dict[str, list[StoredLease]],
    durability: str,
    lossy: dict[tuple[str, int], float] | None = None,
    ttl: float = 600.0,
) -> Report:
    """Check every pool of ``tokens`` (see the module's rules).

    ``start``: each pool's revision once created (before any client); ``stored``: each
    pool's leases in the tables at the end; ``lossy``: (pool, epoch) whose owner was
    SIGKILLed or SIGSTOPped while it held the pool, and when (``time.monotonic``, the
    clock of the operations).
    """
    report = Report()
    by_pool: dict[str, list[Operation]] = {pool: [] for pool in tokens}
    for op in history:
        by_pool.setdefault(op.pool, []).append(op)
        report.operations += 1
    for pool, ops in by_pool.items():
        _PoolCheck(
            pool,
            ops,
            tokens.get(pool, []),
            start.get(pool, 0),
            stored.get(pool, []),
            {e: at for (p, e), at in (lossy or {}).items() if p == pool},
            durability == "async",
            ttl,
            report,
        ).run()
    return report


def _epoch(revision: int) -> int:
    return revision >> EPOCH_SHIFT


def _time(at: datetime | None) -> str:
    return (at or EPOCH).isoformat()


class _PoolCheck:
    """One pool's replay across its owners."""

    def __init__(
        self,
        pool: str,
        ops: list[Operation],
        tokens: list[str],
        start: int,
        stored: list[StoredLease],
        lossy: dict[int, float],
        forgive: bool,
        ttl: float,
        report: Report,
    ) -> None:
        self.pool = pool
        self.tokens = tokens
        self.start = start
        self.stored = stored
        self.lossy = lossy  # epoch -> when its owner was killed or paused
        self.forgive = forgive  # async: an acknowledged change lost there is the window's
        self.ttl = ttl
        self.report = report
        self.mutations: dict[int, Operation] = {}
        self.reads: list[Operation] = []
        self.lost: list[Operation] = []
        self.sent_by: dict[int, float] = {}  # id(lost send) -> when its call was answered
        self._classify(ops)
        self.grant_at: dict[int, StoredLease] = {}
        self.end_at: dict[int, list[StoredLease]] = {}
        for s in stored:
            if s.fence is not None:
                if s.fence in self.grant_at:
                    self._flag(
                        "double holder",
                        f"leases {self.grant_at[s.fence].id} and {s.id}"
                        f" both stored with fence {s.fence}",
                    )
                self.grant_at[s.fence] = s
            if s.ended_revision is not None:
                self.end_at.setdefault(s.ended_revision, []).append(s)
        # A lease a reply names with its fence tells what the change at that revision was.
        self.named: dict[int, dict[str, Any]] = {}
        for op in ops:
            v = op.value
            if op.ok and isinstance(v, dict) and "fence" in v and "id" in v:
                self.named[int(v["fence"])] = v
        self._times()

    def _flag(self, kind: str, detail: str) -> None:
        self.report.anomalies.append(Anomaly(kind, f"{self.pool}: {detail}"))

    def _classify(self, ops: list[Operation]) -> None:
        for op in ops:
            definite = op.ok or op.value in DEFINITE_ERRORS
            if op.lost or not definite:
                if op.kind in MUTATING:  # outcome unknown; a read never answered says nothing
                    self.lost.append(op)
                continue
            if op.repeats and op.kind in MUTATING:
                send = attrs.evolve(op, completed=None, ok=False, value=None, revision=None)
                self.lost.append(send)
                self.sent_by[id(send)] = op.completed or 0.0
                self.report.resends += 1
            if _noop(op) or not op.ok or op.revision is None:
                self.reads.append(op)
                continue
            other = self.mutations.get(op.revision)
            if (
                other is not None
                and op.kind == other.kind == "activate"
                and op.value["id"] == other.value["id"]
            ):
                self.reads.append(op)  # two activations of one user in one batch
                continue
            if other is not None:
                self._flag(
                    "duplicate revision",
                    f"{op.kind} {op.args} and {other.kind} {other.args} both at {op.revision}",
                )
            self.mutations[op.revision] = op
        self.report.mutations += len(self.mutations)
        self.report.reads += len(self.reads)
        self.report.lost += len(self.lost) - len(self.sent_by)

    def _times(self) -> None:
        """The real-time indexes: what completed before a time, what began after one."""
        timed = [op for op in self.mutations.values() if op.completed is not None]
        timed += [op for op in self.reads if op.ok and op.revision is not None]
        timed.sort(key=lambda op: op.completed or 0.0)
        self.done_at = [op.completed or 0.0 for op in timed]
        self.prefix_max: list[int] = []
        best = self.start
        for op in timed:
            best = max(best, op.revision or 0)
            self.prefix_max.append(best)
        self.timed = timed
        starts = sorted((m.invoked, rev) for rev, m in self.mutations.items())
        self.start_times = [t for t, _ in starts]
        self.suffix_min = [0] * len(starts)
        low = 1 << 62
        for i in range(len(starts) - 1, -1, -1):
            low = min(low, starts[i][1])
            self.suffix_min[i] = low

    def floor_before(self, t: float) -> int:
        """The newest revision any call completed before ``t`` had seen."""
        i = bisect.bisect_left(self.done_at, t)
        return self.prefix_max[i - 1] if i else self.start

    def ceiling_after(self, t: float) -> int:
        """The oldest revision of a change invoked after ``t`` (above anything done by ``t``)."""
        i = bisect.bisect_right(self.start_times, t)
        return self.suffix_min[i] if i < len(self.suffix_min) else 1 << 62

    def run(self) -> None:
        self._real_time()
        self._fences()
        self._replay()
        self._tables()

    def _real_time(self) -> None:
        for op in self.timed:
            low = self.floor_before(op.invoked)
            is_mutation = self.mutations.get(op.revision or 0) is op
            rev = op.revision or 0
            if rev < low or (is_mutation and rev == low and low > self.start):
                self._flag(
                    "real-time order",
                    f"{op.kind} {op.args} has revision {rev} but a call that completed"
                    f" before it began had seen revision {low}",
                )

    def _fences(self) -> None:
        grants = sorted(
            (op for op in self.mutations.values() if op.kind == "activate"),
            key=lambda op: op.completed or 0.0,
        )
        done = [op.completed or 0.0 for op in grants]
        highest = list(itertools.accumulate((int(op.value["fence"]) for op in grants), max))
        for op in grants:
            i = bisect.bisect_left(done, op.invoked)
            if i and highest[i - 1] >= int(op.value["fence"]):
                self._flag(
                    "fence went back",
                    f"grant to {op.args[0]} has fence {op.value['fence']}, not above"
                    f" {highest[i - 1]} acknowledged before it was asked",
                )

    def _reseed(self, base: int) -> _Model:
        """The pool as the store held it when the owner of ``base``'s epoch opened it."""
        ids = _Ids()
        model = _Model(self.tokens, timedelta(seconds=self.ttl), ids)
        model.revision = base
        held: dict[str, StoredLease] = {}
        for s in sorted(self.stored, key=lambda s: s.fence or 0):
            if (s.fence or 0) < base and (s.ended_revision is None or s.ended_revision > base):
                held[s.token_id] = s  # two on one token: _tables flags it; the newer wins
        order = sorted(held.values(), key=lambda s: (s.started_at or EPOCH, s.fence or 0))
        model.leases = [
            Lease(
                s.id,
                s.token_id,
                s.user_id,
                s.fence or 0,
                s.started_at or EPOCH,
                (s.started_at or EPOCH) + timedelta(seconds=self.ttl),
            )
            for s in order
        ]
        model.free = [t for t in self.tokens if t not in held]
        return model

    def _replay(self) -> None:
        keys = (
            set(self.mutations)
            | set(self.grant_at)
            | set(self.end_at)
            | set(self.named)
            | {op.revision for op in self.reads if op.revision is not None}
        )
        epochs = sorted({_epoch(r) for r in keys} | {_epoch(self.start)})
        self.report.takeovers += len(epochs) - 1
        pending: list[tuple[int, int, Operation]] = []
        for op in self.reads:
            if op.ok and op.kind == "activate" and op.revision is not None:
                lo = hi = op.revision  # found the user's lease: a read at that revision
            else:
                lo = self.floor_before(op.invoked)
                hi = self.ceiling_after(op.completed or 0.0) - 1
            pending.append((lo, hi, op))
        pending.sort(key=lambda item: item[0])
        self._pending = pending
        self._next = 0
        self._open: dict[int, list[Any]] = {}
        now = EPOCH
        for epoch in epochs:
            base = self.start if epoch == _epoch(self.start) else epoch << EPOCH_SHIFT
            mine = [r for r in keys if _epoch(r) == epoch]
            stored_in = [
                r for r in itertools.chain(self.grant_at, self.end_at) if _epoch(r) == epoch
            ]
            frontier = max(stored_in, default=base)
            top = max([frontier, *mine])
            model = self._reseed(base)
            self._reads(model, base, known=True)
            known = True
            for rev in range(base + 1, top + 1):
                acked = self.mutations.get(rev)
                if known:
                    applied = acked if acked is not None else self._fill(rev, model, frontier)
                    if applied is None:
                        known = False
                    else:
                        before = len(model.history)
                        ids: Any = model.ids
                        found: list[Anomaly] = []
                        now = _apply(model, applied, rev, now, self.ttl, ids, found)
                        for a in found:
                            self._flag(a.kind, a.detail)
                        if rev <= frontier:
                            self._rows(rev, applied, model.history[before:], frontier)
                if acked is not None and not known:
                    self.report.unverifiable += 1
                if acked is not None and rev > frontier:
                    self._unstored(acked, epoch)
                model.revision = rev
                self._reads(model, rev, known)
            if epoch in self.lossy:
                # The owner died holding the pool: it may have applied changes no client
                # learnt of and no row shows before it stopped, and reads are answered
                # from memory (in sync too, so that they keep working while the store is
                # down): a read may have seen them.
                self._reads(None, top + 1, known=False)
        for lo, hi, op in self._pending[self._next :]:
            self._open[id(op)] = [lo, hi, op, False]
        for lo, hi, op, touched in self._open.values():
            if touched:
                self.report.unverifiable += 1
            else:
                self._flag("stale or impossible read", f"{op.kind} {op.args}: window {lo}..{hi}")

    def _reads(self, model: _Model | None, rev: int, known: bool) -> None:
        """Check the reads whose window holds ``rev`` against the model's state there."""
        pending = self._pending
        while self._next < len(pending) and pending[self._next][0] <= rev:
            lo, hi, op = pending[self._next]
            self._open[id(op)] = [lo, hi, op, False]
            self._next += 1
        for key, entry in list(self._open.items()):
            lo, hi, op, _ = entry
            if lo <= rev <= hi:
                if not known or model is None:
                    entry[3] = True
                elif _read_answer(model, op) == _read_reply(op):
                    del self._open[key]
                    continue
            if rev >= hi:
                del self._open[key]
                if entry[3]:
                    self.report.unverifiable += 1
                else:
                    self._flag(
                        "stale or impossible read",
                        f"{op.kind} {op.args} answered {_read_reply(op)!r} (node"
                        f" {op.node or '?'}), which no state from revision {lo} to {hi} gives",
                    )

    def _fill(self, rev: int, model: _Model, frontier: int) -> Operation | None:
        """The change at ``rev`` no reply carries: from the rows at it, or a lease a reply
        names, made by a lost call that can have made it. ``None``: nothing explains it."""
        row = self.grant_at.get(rev)
        released = [s for s in self.end_at.get(rev, []) if s.reason == "released"]
        if row is not None:
            kind, user, token = "activate", row.user_id, row.token_id
            value: Any = {
                "id": row.id,
                "token_id": row.token_id,
                "user_id": row.user_id,
                "fence": rev,
                "activated_at": _time(row.started_at),
            }
        elif released:
            kind, user, token = "release", released[0].user_id, released[0].token_id
            value = rev
        elif rev in self.named:
            v = self.named[rev]
            kind, user, token = "activate", v["user_id"], v["token_id"]
            value = {"id": v["id"], "token_id": token, "user_id": user, "fence": rev}
        else:
            if rev <= frontier:
                self._flag(
                    "unexplained revision",
                    f"revision {rev} is below the store's frontier {frontier} but no row"
                    " and no reply shows what it changed",
                )
            return None

        def fits(op: Operation) -> bool:
            if op.kind != kind or self.floor_before(op.invoked) >= rev:
                return False
            if id(op) in self.sent_by and rev >= self.ceiling_after(self.sent_by[id(op)]):
                return False
            if kind == "activate":
                return op.args[0] == user
            return op.args[0] == token and (len(op.args) == 1 or op.args[1] == user)

        candidates = [op for op in self.lost if fits(op)]
        if candidates:
            # Earliest deadline first: the send whose window closes soonest.
            chosen = min(
                candidates,
                key=lambda op: self.ceiling_after(self.sent_by.get(id(op), float("inf"))),
            )
            self.lost.remove(chosen)
            self.report.lost_applied += 1
            args = chosen.args
        else:
            self._flag(
                "phantom change",
                f"revision {rev} ({kind} of {user}, token {token}) was made by no call",
            )
            args = (user,) if kind == "activate" else (token, user)
        return Operation(-1, kind, args, 0.0, 0.0, True, value, revision=rev, pool=self.pool)

    def _rows(self, rev: int, op: Operation, ended: list[Any], frontier: int) -> None:
        """The rows at ``rev`` are what the change there made, no more, no less."""
        expected: set[tuple[str, ...]] = {("end", u.id, u.reason.value) for u in ended}
        if op.kind == "activate":
            v = op.value
            expected.add(("grant", v["id"], v["token_id"], op.args[0]))
        actual: set[tuple[str, ...]] = {
            ("end", s.id, s.reason or "") for s in self.end_at.get(rev, [])
        }
        row = self.grant_at.get(rev)
        if row is not None:
            actual.add(("grant", row.id, row.token_id, row.user_id))
        for missing in sorted(expected - actual):
            self._flag(
                "lost change",
                f"revision {rev} ({op.kind} {op.args}) made {missing}, which the store lacks"
                f" though it holds the epoch's later revision {frontier}",
            )
        for extra in sorted(actual - expected):
            self._flag("phantom change", f"the store holds {extra} at revision {rev}")

    def _unstored(self, op: Operation, epoch: int) -> None:
        """An acknowledged change above its epoch's frontier: the store never got it."""
        what = f"{self.pool}: {op.kind} {op.args} at revision {op.revision} (node {op.node or '?'})"
        fault = self.lossy.get(epoch)
        if fault is None or not self.forgive:
            self.report.anomalies.append(Anomaly("lost change", f"{what}: acknowledged, gone"))
            return
        age = fault - (op.completed or 0.0)
        self.report.window_lost.append(f"{what}, {age:.3f} s before the fault")
        self.report.window_ages.append(age)

    def _tables(self) -> None:
        from .runs import _overlaps

        for a in _overlaps(self.stored):
            self.report.anomalies.append(Anomaly(a.kind, f"{self.pool}: {a.detail}"))
        ordered = sorted(self.stored, key=lambda s: (s.started_at or EPOCH, s.fence or 0))
        fences = [s.fence or 0 for s in ordered]
        if fences != sorted(set(fences)):
            self._flag("fence order", "stored fences do not grow with the grants' start times")
