"""Checking a recorded history against the naive reference model.

The rules it holds the server to:

1. Revision order respects real time: an operation that completed before another
   was invoked has the lower revision (strictly, when the later one changed the
   pool; a read may share the revision it saw).
2. Replayed in revision order through the reference model, every mutating reply
   equals the model's: the token granted (FIFO, else the oldest lease evicted),
   the fence, the release, the renewal, the number cleared.
3. Every reply that carries no revision (reads, errors) equals the model's answer
   at some revision inside its real-time window: after everything that completed
   before it was invoked, before anything invoked after it completed.
4. A lost ``ACTIVATE`` (connection dropped before the reply) either left no trace
   or granted exactly the lease the server's tables hold for its revision; no
   other revision may go unexplained.
5. At the end the model's history and active leases equal the server's own
   tables, so an acknowledged change that was never applied cannot hide behind a
   later eviction.

The reference model does not model time (leases are given an hour: none expires
during a run), so expiry is left to the model-based state tests.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import attrs

from tests.reference import NaivePool
from tokenpool._model import Lease, Reason, Usage

from .history import Operation

EPOCH = datetime.fromisoformat("2000-01-01T00:00:00+00:00")


@attrs.frozen
class Anomaly:
    kind: str
    detail: str


@attrs.frozen
class StoredLease:
    """A lease as the server's tables hold it, active or ended."""

    id: str
    token_id: str
    user_id: str
    fence: int | None  # the revision that granted it
    reason: str | None  # None while active
    started_at: datetime | None = attrs.field(default=None, eq=False)
    ended_at: datetime | None = attrs.field(default=None, eq=False)
    ended_revision: int | None = attrs.field(default=None, eq=False)  # the revision that ended it


@attrs.define
class Report:
    operations: int
    mutations: int
    reads: int
    lost: int
    lost_applied: int
    anomalies: list[Anomaly]

    @property
    def ok(self) -> bool:
        return not self.anomalies


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class _Model(NaivePool):
    """The naive model with each token's history indexed: long runs read it often."""

    def __init__(self, token_ids: list[str], ttl: timedelta, ids: Callable[[], str]) -> None:
        super().__init__(token_ids, ttl, ids)
        self.by_token: dict[str, list[Usage]] = {}

    def _end(
        self, lease: Lease, at: datetime, reason: Reason, revision: int | None = None
    ) -> Usage:
        usage = super()._end(lease, at, reason, revision)
        self.by_token.setdefault(usage.token_id, []).append(usage)
        return usage

    def history_of(self, token_id: str) -> list[Usage]:
        return self.by_token.get(token_id, [])[::-1]


class _Ids:
    """The model takes each lease id from the reply it is checking."""

    def __init__(self) -> None:
        self.next = ""

    def __call__(self) -> str:
        return self.next


def _noop(op: Operation) -> bool:
    """A successful mutating call that changed nothing (and so bumped no revision)."""
    if not op.ok:
        return False
    if op.kind == "activate":
        return int(op.value["fence"]) != op.revision  # found the user's lease
    return op.kind == "clear" and int(op.value["cleared"]) == 0


def _read_answer(model: _Model, op: Operation) -> Any:
    """What the model answers for a read, or for a mutating call that failed."""
    kind, args = op.kind, op.args
    if kind == "validate":
        lease = model.token_lease(args[0])
        return 1 if lease is not None and lease.id == args[1] else 0
    if kind == "lease":
        lease = model.holder_lease(args[0])
        return None if lease is None else (lease.id, lease.token_id, lease.fence)
    if kind == "token":
        lease = model.token_lease(args[0])
        return ("available", "") if lease is None else ("active", lease.user_id)
    if kind == "history":
        newest = model.by_token.get(args[0], [])[:-6:-1]  # HISTORY ... LIMIT 5
        return [(u.id, u.user_id, u.reason.value) for u in newest]
    if kind == "release":
        lease = model.token_lease(args[0])
        if lease is None:
            return "NOTACTIVE"
        if len(args) > 1 and args[1] != lease.user_id:
            return "NOTHOLDER"
        return "OK"
    if kind == "renew":
        lease = model.token_lease(args[0])
        return "NOTHOLDER" if lease is None or lease.id != args[1] else "OK"
    if kind == "activate":  # an activation that found the user's lease: a read of it
        lease = model.holder_lease(args[0])
        return None if lease is None else (lease.id, lease.token_id, lease.fence)
    if kind == "clear":  # a clear that found nothing to clear
        return len(model.leases)
    return "?"


def _read_reply(op: Operation) -> Any:
    """The recorded reply in the shape ``_read_answer`` gives."""
    if not op.ok:
        return op.value
    v = op.value
    if op.kind == "validate":
        return v
    if op.kind in ("lease", "activate"):
        return None if v is None else (v["id"], v["token_id"], int(v["fence"]))
    if op.kind == "token":
        return (v["status"], v["current_user_id"])
    if op.kind == "history":
        return [(u["id"], u["user_id"], u["reason"]) for u in v]
    if op.kind == "clear":
        return int(v["cleared"])
    return v


def check(
    history: list[Operation],
    *,
    tokens: list[str],
    start_revision: int,
    end_revision: int,
    stored: Iterable[StoredLease],
    ttl: float = 3600.0,
) -> Report:
    """Check ``history`` (see the module's rules); ``stored`` is the server's tables at the end."""
    anomalies: list[Anomaly] = []
    stored = list(stored)
    stored_ids = {s.id: s for s in stored}

    # Which operations changed the pool at which revision. A CLEAR that ended n leases
    # took the n revisions up to the one it answered: it is applied at the first of them,
    # and the others are covered (never observable: the clear is one actor operation).
    mutations: dict[int, Operation] = {}
    covered: set[int] = set()
    reads: list[Operation] = []
    lost = [op for op in history if op.lost]
    for op in history:
        if op.lost:
            continue
        if not op.ok and op.value == "UNAVAILABLE":
            continue  # refused before it was applied (async mode, the backlog full)
        if _noop(op):
            reads.append(op)  # changed nothing: checked as a read at its revision
        elif op.ok and op.revision is not None:
            if op.kind == "clear":
                cleared = int(op.value["cleared"])
                first = op.revision - cleared + 1
                covered.update(range(first + 1, op.revision + 1))
                if first in mutations:
                    anomalies.append(
                        Anomaly("duplicate revision", f"clear and another change at {first}")
                    )
                mutations[first] = op
                continue
            other = mutations.get(op.revision)
            if (
                other is not None
                and op.kind == other.kind == "activate"
                and op.value["id"] == other.value["id"]
            ):
                # Two activations of one user in one batch: one granted, the other found
                # that lease at the same revision. Replies cannot tell which: either order
                # gives the same state, so the second is checked as a read.
                reads.append(op)
                continue
            if op.revision in mutations:
                anomalies.append(
                    Anomaly(
                        "duplicate revision",
                        f"{op.kind} {op.args} and {mutations[op.revision].kind}"
                        f" {mutations[op.revision].args} both at revision {op.revision}",
                    )
                )
            mutations[op.revision] = op
        else:
            reads.append(op)

    # Rule 4: a revision no answered operation explains must be a lost ACTIVATE. The
    # leases the server holds that no reply named are what those lost calls granted;
    # in the order they started (grants start in revision order), they fill the gaps.
    lost_by_user: dict[str, list[Operation]] = {}
    for op in lost:
        lost_by_user.setdefault(op.args[0], []).append(op)
    # A lease a reply names with its fence (another call of the same user found it,
    # or a LEASE read) tells its revision; the others fill the remaining gaps in order.
    named: dict[int, tuple[str, str, str]] = {}
    for op in history:
        v = op.value
        if op.ok and isinstance(v, dict) and "fence" in v and "id" in v:
            named[int(v["fence"])] = (v["id"], v["token_id"], v["user_id"])
    seen = {lease_id for lease_id, _, _ in named.values()}
    unnamed = sorted(
        (s for s in stored if s.id not in seen),
        key=lambda s: (s.started_at or EPOCH, s.fence or 0),
    )
    gaps = {
        r
        for r in range(start_revision + 1, end_revision + 1)
        if r not in mutations and r not in covered
    }
    lost_applied = 0

    def fill(rev: int, model: NaivePool) -> Operation | None:
        """The lost ACTIVATE that made revision ``rev`` (called in replay, at ``rev``)."""
        nonlocal lost_applied
        if rev in named:
            lease_id, token_id, user_id = named[rev]
        elif unnamed:
            # Leases of one batch share their start time, so among those the token the
            # model grants now tells which lease this revision made.
            group = 1
            while group < len(unnamed) and unnamed[group].started_at == unnamed[0].started_at:
                group += 1
            if model.free:
                predicted = model.free[0]
            elif model.leases:
                predicted = min(model.leases, key=lambda x: (x.activated_at, x.fence)).token_id
            else:
                predicted = ""
            pick = next(
                (i for i in range(group) if unnamed[i].token_id == predicted),
                0,
            )
            found = unnamed.pop(pick)
            lease_id, token_id, user_id = found.id, found.token_id, found.user_id
        else:
            anomalies.append(
                Anomaly("unexplained revision", f"revision {rev} matches no acknowledged change")
            )
            return None
        candidates = lost_by_user.get(user_id, [])
        if not candidates:
            anomalies.append(
                Anomaly(
                    "phantom change",
                    f"lease {lease_id} of {user_id} (revision {rev}) was granted by no call",
                )
            )
            return None
        op = candidates.pop(0)
        lost_applied += 1
        op.revision = rev
        op.value = {"id": lease_id, "token_id": token_id, "fence": rev}
        mutations[rev] = op
        return op

    # Rule 1: real time. Sweep operations by completion; compare with later invocations.
    timed = sorted(
        (op for op in history if op.revision is not None and op.completed is not None),
        key=lambda op: op.completed or 0.0,
    )
    done_at = [op.completed or 0.0 for op in timed]
    prefix_max: list[int] = []
    best = start_revision
    for op in timed:
        best = max(best, op.revision or 0)
        prefix_max.append(best)

    def floor_before(t: float) -> int:
        i = bisect.bisect_left(done_at, t)
        return prefix_max[i - 1] if i else start_revision

    for op in history:
        if op.revision is None or op.lost:
            continue
        low = floor_before(op.invoked)
        is_mutation = mutations.get(op.revision) is op
        if op.revision < low or (is_mutation and op.revision == low and low > start_revision):
            anomalies.append(
                Anomaly(
                    "real-time order",
                    f"{op.kind} {op.args} has revision {op.revision} but an operation that"
                    f" completed before it began has revision {low}",
                )
            )

    # Windows of reads: [after what completed before, before what was invoked after].
    starts = sorted((m.invoked, rev) for rev, m in mutations.items() if not m.lost)
    start_times = [t for t, _ in starts]
    suffix_min = [0] * len(starts)
    low_rev = end_revision + 1
    for i in range(len(starts) - 1, -1, -1):
        low_rev = min(low_rev, starts[i][1])
        suffix_min[i] = low_rev
    pending: list[tuple[int, int, Operation]] = []
    for op in reads:
        if _noop(op) or (op.ok and op.kind == "activate"):
            lo = hi = op.revision or 0
        else:
            lo = floor_before(op.invoked)
            i = bisect.bisect_right(start_times, op.completed or 0.0)
            hi = (suffix_min[i] - 1) if i < len(starts) else end_revision
        pending.append((lo, hi, op))
    pending.sort(key=lambda item: item[0])

    # Rules 2 and 3: replay.
    ids = _Ids()
    model = _Model(tokens, timedelta(seconds=ttl), ids)
    model.revision = start_revision
    unsatisfied: dict[int, tuple[int, int, Operation]] = {}
    nxt = 0

    def check_reads(rev: int) -> None:
        nonlocal nxt
        while nxt < len(pending) and pending[nxt][0] <= rev:
            unsatisfied[id(pending[nxt][2])] = pending[nxt]
            nxt += 1
        for key, (lo, hi, op) in list(unsatisfied.items()):
            if lo <= rev <= hi and _read_answer(model, op) == _read_reply(op):
                del unsatisfied[key]
            elif rev >= hi:
                del unsatisfied[key]
                anomalies.append(
                    Anomaly(
                        "stale or impossible read",
                        f"{op.kind} {op.args} answered {_read_reply(op)!r}, which no state from"
                        f" revision {lo} to {hi} gives",
                    )
                )

    now = EPOCH
    check_reads(start_revision)
    for rev in range(start_revision + 1, end_revision + 1):
        applied = mutations.get(rev)
        if applied is None and rev in gaps:
            applied = fill(rev, model)
        if applied is not None:
            now = _apply(model, applied, rev, now, ttl, ids, anomalies)
        model.revision = rev
        check_reads(rev)
    check_reads(end_revision + 1)
    for lo, hi, op in unsatisfied.values():
        anomalies.append(
            Anomaly("stale or impossible read", f"{op.kind} {op.args}: window {lo}..{hi}")
        )

    # Rule 5: the server's tables.
    model_ended = {u.id: u for u in model.history}
    model_active = {lease.id: lease for lease in model.leases}
    for lease_id, usage in model_ended.items():
        row = stored_ids.get(lease_id)
        if row is None or row.reason != usage.reason.value:
            anomalies.append(
                Anomaly(
                    "lost change",
                    f"lease {lease_id} of {usage.user_id} ended {usage.reason.value} in the"
                    f" model but the server's tables hold {row}",
                )
            )
    for lease_id, active in model_active.items():
        row = stored_ids.get(lease_id)
        if row is None or row.reason is not None:
            anomalies.append(
                Anomaly(
                    "lost change",
                    f"lease {lease_id} of {active.user_id} is active in the model but the"
                    f" server's tables hold {row}",
                )
            )
    for row in stored:
        if row.id not in model_ended and row.id not in model_active:
            anomalies.append(Anomaly("phantom change", f"the server holds {row}, the model not"))
    return Report(
        operations=len(history),
        mutations=len(mutations),
        reads=len(reads),
        lost=len(lost),
        lost_applied=lost_applied,
        anomalies=anomalies,
    )


def _apply(
    model: NaivePool,
    op: Operation,
    rev: int,
    now: datetime,
    ttl: float,
    ids: _Ids,
    anomalies: list[Anomaly],
) -> datetime:
    """Apply one mutating operation to the model and compare the reply."""
    v = op.value
    if op.kind == "activate":
        if "activated_at" in v:
            now = max(now, _time(v["activated_at"]))
        ids.next = v["id"]
        held = model.holder_lease(op.args[0])
        lease = model.activate(op.args[0], now)
        assert isinstance(lease, Lease)
        if held is not None or (lease.token_id, lease.fence) != (v["token_id"], int(v["fence"])):
            expected = "the lease already held" if held else f"token {lease.token_id}"
            anomalies.append(
                Anomaly(
                    "wrong grant",
                    f"activate {op.args[0]} at revision {rev} got token {v['token_id']}"
                    f" (fence {v['fence']}); the model grants {expected}",
                )
            )
            _force(model, op.args[0], v, lease, now, ttl)
    elif op.kind == "release":
        released = model.release(op.args[0], op.args[1] if len(op.args) > 1 else None, now)
        if not isinstance(released, Usage):
            anomalies.append(
                Anomaly("wrong release", f"release {op.args} succeeded at {rev}; model: {released}")
            )
    elif op.kind == "renew":
        now = max(now, _time(v["expires_at"]) - timedelta(seconds=ttl))
        result = model.renew(op.args[0], op.args[1], now)
        if not isinstance(result, Lease):
            anomalies.append(
                Anomaly("wrong renew", f"renew {op.args} succeeded at {rev}; model: {result}")
            )
    elif op.kind == "clear":
        count = model.clear(now)
        if count != int(v["cleared"]):
            anomalies.append(
                Anomaly("wrong clear", f"clear at {rev} ended {v['cleared']}; model: {count}")
            )
    model.revision = rev
    return now


def _force(
    model: NaivePool, user: str, v: dict[str, Any], granted: Lease, now: datetime, ttl: float
) -> None:
    """After a wrong grant, make the model agree with the server, so one bug is one anomaly."""
    model.leases.remove(granted)
    model.free.insert(0, granted.token_id)
    other = model.token_lease(v["token_id"])
    if other is not None:
        model.leases.remove(other)
    if v["token_id"] in model.free:
        model.free.remove(v["token_id"])
    model.leases.append(
        Lease(v["id"], v["token_id"], user, int(v["fence"]), now, now + timedelta(seconds=ttl))
    )
