"""The cluster run: three ``tokenpool serve`` nodes on one PostgreSQL, clients on every
node, and the faults of issue 20 one after another.

Clients: ``RedisCluster`` threads (each seeded at another node) leasing, releasing and
asking ``LEASE``, ``VALIDATE`` and ``TOKEN``; one thread of the client library
(``tokenpool.connect``, seeded at one node); ``redis-cli -c`` once a second; all in 30
pools. Every call is recorded (pool, arguments, reply with its lease, fence and
revision, the real-time window, the node that answered when the client can tell).
Faults: SIGKILL of the first node, SIGSTOP of the second for ``pause`` seconds then
SIGCONT, a restart of the first (same node id and port), ``CLUSTER DRAIN`` of the
third. After each fault a probe times how long until every pool is served again
(``TP.LEASE`` answered by its owner: an answer that vouches).

Checked by ``owners.check`` (the history checker across owners; its rules are in its
module): per pool, every reply explained by one sequential run of the rules through
the owners, re-seeded from the store at each takeover; fences strictly increase; no
two holders, from the replay and from the stored leases; in ``sync`` every
acknowledged change stored (``async``: the ones lost are counted, and only in a
killed or paused owner's window). And: every pool served again within 5 s of each
fault; the slots spread evenly again after the restart.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attrs
import redis
import trio
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

import tokenpool
from tokenpool._cluster.slots import SLOTS, key_slot

from . import owners
from .checker import Anomaly, StoredLease
from .history import Operation
from .runs import ROOT, Summary, _Memory, _summary, store
from .server import Process, free_port, start, stored_leases

POOLS = 30
SERVED_WITHIN = 5.0
TTL = 600  # seconds: no lease expires during a run (the reference model has no clock)
NO_LEASE = "00000000-0000-4000-8000-000000000000"
LIBRARY, CLI = 1000, 1001  # the client numbers of the library's thread and of redis-cli


class _Node:
    def __init__(self, name: str, url: str, durability: str, args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.url = url
        self.port = free_port()
        self.durability = durability
        self.args = args
        self.process: Process | None = None

    def start(self) -> None:
        self.process = start(
            *("--dsn", self.url, "--node-id", self.name),
            *("--advertise", f"127.0.0.1:{self.port}", "--durability", self.durability),
            *self.args,
            port=self.port,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def info(self) -> dict[str, str]:
        with _probe(self.port) as r:
            raw = r.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _until(check: Callable[[], bool], seconds: float, since: float | None = None) -> float | None:
    """Seconds until ``check()`` held (errors count as not yet), or None past ``seconds``;
    counted from ``since`` (``time.monotonic()``, the same clock in every process) or now."""
    began = time.monotonic() if since is None else since
    while time.monotonic() - began < seconds:
        try:
            if check():
                return time.monotonic() - began
        except (redis.RedisError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    return None


def _all_served(ports: list[int], pools: list[str]) -> bool:
    """Every pool answers ``TP.LEASE`` on the node CLUSTER SLOTS names (a live node's)."""
    ranges = None
    for port in ports:  # the first that answers with a valid lease (not a paused one)
        try:
            with _probe(port) as r:
                raw = r.execute_command("CLUSTER", "INFO")
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                if "tokenpool_lease_valid:1" in text.split():
                    ranges = r.execute_command("CLUSTER", "SLOTS")
                    break
        except (redis.RedisError, OSError):
            continue
    if ranges is None:
        return False
    for pool in pools:
        slot = key_slot(pool)
        port = next((int(e[2][1]) for e in ranges if e[0] <= slot <= e[1]), 0)
        if not port:
            return False  # a slot between two owners
        with _probe(port) as r:
            r.execute_command("TP.LEASE", pool, "probe")
    return True


class _ServedProbe:
    """Times how long after a fault every pool is served again (``_all_served``), in a
    process of its own, started (and its imports done) before the faults: the clients'
    threads hold this process's GIL and would slow a probe here down."""

    def __init__(self, pools: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.nodes", *pools],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def served(self, ports: list[int], since: float, seconds: float = 30) -> float | None:
        """Seconds from ``since`` (``time.monotonic()`` of the fault: one clock for every
        process) until every pool answered on its owner, or None past ``seconds``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{since} {seconds} {','.join(map(str, ports))}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        return None if answer in ("None", "") else float(answer)

    def close(self) -> None:
        try:
            self.proc.communicate(timeout=35)  # it ends once a measure under way ends
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _probe_main(pools: list[str]) -> None:
    """The probe process: a line ``since seconds port,port...`` in, the seconds out."""
    for line in sys.stdin:
        since, seconds, where = line.split()
        ports = [int(p) for p in where.split(",")]
        check = functools.partial(_all_served, ports, pools)
        print(_until(check, float(seconds), float(since)), flush=True)


def _probe(port: int) -> redis.Redis:
    """A probe's connection: one try, 1 s at most (a paused node must not hold it)."""
    return redis.Redis(
        port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )


def _balanced(nodes: list[_Node]) -> bool:
    share = SLOTS // len(nodes)
    infos = [n.info() for n in nodes]
    return all(
        i["cluster_state"] == "ok" and share <= int(i["tokenpool_slots_served"]) <= share + 1
        for i in infos
    )


@attrs.define
class Recording:
    """What a cluster run saw: every client's calls, and the tables at the end."""

    durability: str
    history: list[Operation]
    tokens: dict[str, list[str]]
    start: dict[str, int]  # each pool's revision once created
    stored: dict[str, list[StoredLease]]
    lossy: dict[tuple[str, int], float]  # (pool, epoch) held by a killed or paused owner

    def check(self) -> owners.Report:
        return owners.check(
            self.history,
            tokens=self.tokens,
            start=self.start,
            stored=self.stored,
            durability=self.durability,
            lossy=self.lossy,
        )


def _spread(nodes: list[_Node]) -> str:
    """Each node's view of itself, for a report: state, slots owned and served."""
    views = []
    for node in nodes:
        try:
            info = node.info()
        except (redis.RedisError, OSError) as e:
            views.append(f"{node.name}: {e}")
            continue
        views.append(
            f"{node.name}: {info.get('cluster_state')} {info.get('tokenpool_node_state')}"
            f" owned {info.get('tokenpool_slots_owned')} served"
            f" {info.get('tokenpool_slots_served')}"
        )
    return "; ".join(views)


def cluster_run(
    clients: int, operations: int, *, dsn: str | None, durability: str, pause: float = 10.0
) -> Summary:
    return record_cluster(clients, operations, dsn=dsn, durability=durability, pause=pause)[0]


def record_cluster(
    clients: int,
    operations: int,
    *,
    dsn: str | None,
    durability: str,
    pause: float = 10.0,
    node_args: tuple[str, ...] = (),
) -> tuple[Summary, Recording | None]:
    """The run; its row, and what it recorded (``None`` without PostgreSQL).

    ``node_args``: more options for every node (the short run in ``make test`` gives a
    shorter ``--cluster-validity``, so takeovers come sooner)."""
    if dsn is None or not dsn.startswith("postgres"):
        return _summary(
            f"cluster ({durability})",
            [Anomaly("setup", "the cluster run needs --dsn postgresql://...")],
            operations=0,
            clients=0,
            faults="-",
            rss=0.0,
        ), None
    with store(dsn) as url:
        return _run(url, clients, operations, durability, pause, node_args)


# What the RedisCluster clients ask, and how often.
KINDS = (("activate", 45), ("release", 20), ("lease", 15), ("validate", 12), ("token", 8))
USERS = 24


def _fields(reply: Any) -> dict[str, str]:
    """A field/value reply (RESP2 list or RESP3 map) as text."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {_text(k): "" if v is None else _text(v) for k, v in pairs}


def _answer(op: Operation, reply: Any) -> None:
    """Record a reply (``checker.py``'s shapes: a dict for field/value replies)."""
    op.completed = time.monotonic()
    op.ok = True
    if op.kind in ("activate", "lease", "token"):
        op.value = None if reply is None else _fields(reply)
    else:
        op.value = int(reply)
    if op.kind == "activate":
        op.revision = int(op.value["revision"])
    elif op.kind == "release":
        op.revision = op.value


def _refused(op: Operation, code: str) -> bool:
    """A refusal that says the call changed nothing: recorded; else the outcome is unknown."""
    if code not in owners.DEFINITE_ERRORS:
        return False
    op.completed = time.monotonic()
    op.value = code
    return True


def _run(
    url: str,
    clients: int,
    operations: int,
    durability: str,
    pause: float,
    node_args: tuple[str, ...],
) -> tuple[Summary, Recording]:
    nodes = [_Node(f"n{i}", url, durability, node_args) for i in (1, 2, 3)]
    pools = [f"load{i}" for i in range(POOLS)]
    history: list[Operation] = []
    acknowledged = [0]
    stop = threading.Event()
    anomalies: list[Anomaly] = []
    facts: dict[str, Any] = {}
    memories: list[_Memory] = []
    processes: list[tuple[str, Process]] = []
    faults: list[tuple[str, float, float]] = []  # (node, wall time, monotonic time)
    tokens: dict[str, list[str]] = {}
    start: dict[str, int] = {}
    threads: list[threading.Thread] = []
    probe = _ServedProbe(pools)
    try:
        for node in nodes:
            node.start()
            assert node.process is not None
            memories.append(_Memory(node.process.pid))
            processes.append((node.name, node.process))
        if _until(lambda: _balanced(nodes), 60) is None:
            anomalies.append(Anomaly("setup", "the slots did not spread over three nodes"))
        seed = _seed(nodes[0].port)
        for pool in pools:
            seed.execute_command("POOL", "CREATE", pool, "SIZE", 4, "TTL", TTL)
            tokens[pool] = [_fields(t)["id"] for t in seed.execute_command("TP.TOKENS", pool)]
            start[pool] = int(_fields(seed.execute_command("TP.STATS", pool))["revision"])
        seed.close()

        def resp_client(i: int) -> None:
            rng = random.Random(i)
            rc: Any = redis.RedisCluster(
                host="127.0.0.1",
                port=nodes[i % 3].port,
                socket_timeout=1,
                socket_connect_timeout=1,
                decode_responses=True,
            )
            seen: dict[str, dict[str, tuple[str, str]]] = {p: {} for p in pools}
            kinds = [k for k, _ in KINDS]
            weights = [w for _, w in KINDS]
            try:
                while not stop.is_set() and acknowledged[0] < operations:
                    pool = rng.choice(pools)
                    kind = rng.choices(kinds, weights)[0]
                    user = f"u{rng.randrange(USERS)}"
                    token = rng.choice(tokens[pool])
                    lease, holder = seen[pool].get(token, (NO_LEASE, user))
                    args: tuple[str, ...] = {
                        "activate": (user,),
                        "release": (token, holder) if rng.random() < 0.7 else (token,),
                        "lease": (user,),
                        "validate": (token, lease),
                        "token": (token,),
                    }[kind]
                    op = Operation(
                        i,
                        kind,
                        args,
                        time.monotonic(),
                        pool=pool,
                        repeats=kind in owners.MUTATING,  # RedisCluster retries a call
                    )
                    history.append(op)
                    try:
                        reply = rc.execute_command(f"TP.{kind.upper()}", pool, *args)
                    except redis.ResponseError as e:
                        if not _refused(op, str(e).split(" ", 1)[0]):
                            time.sleep(0.05)
                        continue
                    except (redis.RedisError, RedisClusterException, OSError):
                        time.sleep(0.05)  # outcome unknown
                        continue
                    _answer(op, reply)
                    with contextlib.suppress(RedisClusterException, AttributeError):
                        op.node = str(rc.get_node_from_key(pool).port)
                    if kind == "activate":
                        acknowledged[0] += 1
                    if op.ok and isinstance(op.value, dict) and "token_id" in op.value:
                        seen[pool][op.value["token_id"]] = (op.value["id"], op.value["user_id"])
            finally:
                rc.close()

        def library_client() -> None:
            """The client library: a fresh user per activation (so each is a grant),
            released or validated next."""

            async def go() -> None:
                rng = random.Random(99)
                address = f"tokenpool://127.0.0.1:{nodes[1].port}"
                async with tokenpool.connect(address, timeout=3) as client:
                    for n in itertools.count():
                        if stop.is_set() or acknowledged[0] >= operations:
                            return
                        pool = rng.choice(pools)
                        remote = client.pool(pool)
                        user = f"lib{n}"
                        # activate() is resent once on a broken connection: a repeat.
                        op = Operation(LIBRARY, "activate", (user,), time.monotonic(), pool=pool)
                        op.repeats = True
                        history.append(op)
                        try:
                            got = await remote.activate(user)
                        except tokenpool.TokenPoolError:
                            await trio.sleep(0.05)
                            continue
                        op.completed, op.ok = time.monotonic(), True
                        op.value = {
                            "id": got.id,
                            "token_id": got.token_id,
                            "user_id": got.user_id,
                            "fence": got.fence,
                            "activated_at": got.activated_at.isoformat(),
                        }
                        op.revision = got.fence  # a fresh user's activation is a grant
                        acknowledged[0] += 1
                        if rng.random() < 0.5:
                            args = (got.token_id, user)
                            op = Operation(LIBRARY, "release", args, time.monotonic(), pool=pool)
                            history.append(op)
                            try:
                                usage = await remote.release(*args)
                            except tokenpool.TokenPoolError as e:
                                _refused(op, e.code)
                                continue
                            _answer(op, usage.revision)
                        else:
                            args = (got.token_id, got.id)
                            op = Operation(LIBRARY, "validate", args, time.monotonic(), pool=pool)
                            history.append(op)
                            with contextlib.suppress(tokenpool.TokenPoolError):
                                _answer(op, int(await remote.validate(*args)))

            trio.run(go)

        def cli_client() -> None:
            rng = random.Random(7)
            while not stop.is_set() and shutil.which("redis-cli"):
                pool = rng.choice(pools)
                port = rng.choice([n for n in nodes if n.running()]).port
                op = Operation(CLI, "activate", ("cli",), time.monotonic(), pool=pool)
                history.append(op)
                try:
                    out = subprocess.run(
                        ["redis-cli", "-c", "-p", str(port), "TP.ACTIVATE", pool, "cli"],
                        capture_output=True,
                        text=True,
                        timeout=10,
                    ).stdout.split()
                except subprocess.TimeoutExpired:  # a paused node: outcome unknown
                    continue
                if len(out) > 1 and out[0] == "id":
                    _answer(op, out)
                    acknowledged[0] += 1
                stop.wait(1.0)

        threads += [
            threading.Thread(target=resp_client, args=(i,), daemon=True)
            for i in range(max(1, clients - 2))
        ]
        threads += [
            threading.Thread(target=library_client, daemon=True),
            threading.Thread(target=cli_client, daemon=True),
        ]
        for t in threads:
            t.start()
        first, paused, drained = nodes
        time.sleep(2)
        assert first.process is not None
        faults.append((first.name, time.time(), time.monotonic()))
        first.process.kill()
        facts["kill"] = probe.served([n.port for n in nodes], faults[-1][2])
        assert paused.process is not None
        faults.append((paused.name, time.time(), time.monotonic()))
        os.kill(paused.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        facts["pause"] = probe.served([drained.port], stopped)
        time.sleep(max(0.0, pause - (time.monotonic() - stopped)))
        os.kill(paused.process.pid, signal.SIGCONT)
        first.start()
        assert first.process is not None
        memories.append(_Memory(first.process.pid))
        processes.append((first.name, first.process))
        facts["rebalanced"] = _until(lambda: _balanced(nodes), 60)
        if facts["rebalanced"] is None:
            facts["spread"] = _spread(nodes)
        with redis.Redis(port=drained.port, socket_timeout=30) as r:
            r.execute_command("CLUSTER", "DRAIN")
        facts["drain"] = probe.served([n.port for n in nodes], time.monotonic())
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for node in nodes:
            if node.running():
                assert node.process is not None
                os.kill(node.process.pid, signal.SIGCONT)
                node.process.stop()
        probe.close()
    rss = max(m.stop() for m in memories)
    for fault in ("kill", "pause", "drain"):
        took = facts.get(fault)
        if took is None or took > SERVED_WITHIN:
            anomalies.append(Anomaly("not served", f"after the {fault}: {took} s"))
    if facts.get("rebalanced") is None:
        anomalies.append(
            Anomaly(
                "unbalanced",
                f"the slots did not spread after the restart: {facts.get('spread')}",
            )
        )
    port_names = {str(n.port): n.name for n in nodes}
    for op in history:
        op.node = port_names.get(op.node, op.node)
    recording = Recording(
        durability,
        history,
        tokens,
        start,
        {pool: stored_leases(url, pool) for pool in pools},
        _lossy(processes, faults),
    )
    report = recording.check()
    anomalies += report.anomalies
    answered = sum(1 for op in history if not op.lost)
    oldest = max(report.window_ages, default=0.0)
    faults_text = (
        f"3 nodes, {POOLS} pools; n1 SIGKILLed: all pools served again in {_s(facts, 'kill')};"
        f" n2 SIGSTOPped {pause:g} s: served in {_s(facts, 'pause')}; n1 restarted: slots"
        f" even again in {_s(facts, 'rebalanced')}; n3 drained: served in"
        f" {_s(facts, 'drain')}; {answered:,} of {len(history):,} calls answered, checked"
        f" across {report.takeovers} owner changes ({report.mutations:,} changes,"
        f" {report.reads:,} reads and refusals; {report.lost} calls unanswered and"
        f" {report.resends:,} maybe sent twice, {report.lost_applied} such sends took effect)"
        + (
            f"; {len(report.window_lost)} acknowledged changes lost in the killed and paused"
            f" owners' windows (oldest {oldest * 1000:.0f} ms before the fault),"
            f" {report.unverifiable} replies after them unverifiable"
            if durability == "async"
            else ""
        )
    )
    summary = _summary(
        f"cluster ({durability})",
        anomalies,
        operations=answered,
        clients=len(threads),
        faults=faults_text,
        rss=rss,
    )
    summary.detail += _takeover(nodes[1:], faults[0][1] if faults else 0.0)
    summary.detail += report.window_lost[:5]
    return summary, recording


def _seed(port: int, tries: int = 5) -> Any:
    """A RedisCluster client for the setup (tried again while the slot map settles: a
    first try once met a node not yet reachable)."""
    for attempt in range(tries):
        try:
            return redis.RedisCluster(
                host="127.0.0.1", port=port, socket_timeout=10, decode_responses=True
            )
        except (redis.RedisError, RedisClusterException, OSError):
            if attempt == tries - 1:
                raise
            time.sleep(1)
    return None


def _lossy(
    processes: list[tuple[str, Process]], faults: list[tuple[str, float, float]]
) -> dict[tuple[str, int], float]:
    """The (pool, epoch) each fault's victim held when it struck (from the nodes' logs:
    the last ``pool_recovered`` of each pool before the fault was the victim's), and when
    (``time.monotonic``)."""
    opened = sorted(
        (_when(event["timestamp"]), str(event["pool"]), int(event["epoch"]), name)
        for name, process in processes
        for event in list(process.log)
        if event.get("event") == "pool_recovered"
    )
    lossy: dict[tuple[str, int], float] = {}
    for victim, wall, mono in faults:
        last: dict[str, tuple[int, str]] = {}
        for at, pool, epoch, name in opened:
            if at < wall:
                last[pool] = (epoch, name)
        for pool, (epoch, name) in last.items():
            if name == victim:
                lossy[(pool, epoch)] = mono
    return lossy


def _when(stamp: Any) -> float:
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def _takeover(nodes: list[_Node], killed_at: float) -> list[str]:
    """When the survivors took the killed node's slots and served their pools (their
    log), counted from the kill."""
    lines = []
    for node in nodes:
        assert node.process is not None
        for event in node.process.log:
            if event.get("event") not in ("cluster_slots_taken", "cluster_slots_served"):
                continue
            at = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            after = at.timestamp() - killed_at
            if 0 < after < 15:
                lines.append(
                    f"{node.name} {event['event']} +{after:.2f} s: {event.get('slots')} slots"
                    + (
                        f", {event['pools']} pools in {event['seconds']} s"
                        if "pools" in event
                        else ""
                    )
                )
    return lines


def _s(facts: dict[str, Any], key: str) -> str:
    value = facts.get(key)
    return "never" if value is None else f"{value:.1f} s"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


if __name__ == "__main__":  # ``_ServedProbe``'s process
    _probe_main(sys.argv[1:])
