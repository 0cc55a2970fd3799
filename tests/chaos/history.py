"""Recording a history: many concurrent RESP clients against a running server.

Every operation is recorded with when it was invoked, when its reply came (or
``None`` when the connection was lost first: the outcome is unknown), the reply,
and the pool revision a mutating reply carries. Some clients drop their
connection right after sending an ``ACTIVATE``, so the history holds operations
whose outcome only the server's own tables can tell.

The generator is deliberately adversarial for a small pool: few tokens, a user
space a few times larger (evictions all the time), lease ids remembered from
earlier replies (so ``RENEW`` and ``VALIDATE`` see stale leases too), and an
occasional ``CLEAR``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import attrs
import hiredis
import trio

from tokenpool._resp import encode_command as encode

KINDS = (
    ("activate", 40),
    ("release", 14),
    ("renew", 10),
    ("validate", 10),
    ("lease", 10),
    ("token", 8),
    ("history", 6),
    ("clear", 1),
)


@attrs.define
class Operation:
    """One client call. ``completed is None``: the connection was lost, outcome unknown."""

    client: int
    kind: str
    args: tuple[str, ...]
    invoked: float
    completed: float | None = None
    ok: bool = False
    value: Any = None  # the reply (a dict for field/value replies), or the error code
    error: str = ""  # the whole error line, for the report
    revision: int | None = None  # carried by a successful mutating reply
    pool: str = "default"
    node: str = ""  # the node that answered, when the client can tell (cluster runs)
    repeats: bool = False  # the client may have sent it more than once (its own retries)

    @property
    def lost(self) -> bool:
        return self.completed is None

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _pairs(reply: Any) -> Any:
    """A RESP2 field/value array as a dict (lists of them too); anything else as is."""
    if isinstance(reply, list) and reply and all(isinstance(x, list) for x in reply):
        return [_pairs(x) for x in reply]
    if isinstance(reply, list) and len(reply) % 2 == 0 and reply and isinstance(reply[0], str):
        return dict(zip(reply[::2], reply[1::2], strict=True))
    return reply


class _Client:
    """One connection: send a command, wait for its one reply."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader(encoding="utf-8")

    @classmethod
    async def open(cls, port: int) -> _Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def call(self, *args: str) -> Any:
        await self.stream.send_all(encode(*args))
        while (reply := self.reader.gets()) is False:
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("the server closed the connection")
            self.reader.feed(data)
        return reply

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def call_many(client: _Client, batch: Sequence[tuple[str, ...]]) -> list[Any]:
    """Send ``batch`` at once (a pipeline); its replies, in order."""
    await client.stream.send_all(b"".join(encode(*args) for args in batch))
    out: list[Any] = []
    while len(out) < len(batch):
        reply = client.reader.gets()
        if reply is False:
            data = await client.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("the server closed the connection")
            client.reader.feed(data)
            continue
        out.append(reply)
    return out


async def _reconnect(port: int, seconds: float = 60.0) -> _Client:
    """A new connection, retried while the server restarts."""
    with trio.fail_after(seconds):
        while True:
            try:
                return await _Client.open(port)
            except OSError:
                await trio.sleep(0.02)


async def pool_tokens(port: int) -> list[str]:
    """The pool's token ids in creation order (a fresh pool: its FIFO order too)."""
    client = await _Client.open(port)
    try:
        return [t["id"] for t in _pairs(await client.call("TOKENS"))]
    finally:
        await client.aclose()


async def pool_stats(port: int, pool: str | None = None) -> dict[str, Any]:
    """The server's STATS as a dict (``TP.STATS <pool>`` with a pool)."""
    client = await _Client.open(port)
    try:
        ask = ("STATS",) if pool is None else ("TP.STATS", pool)
        stats: dict[str, Any] = _pairs(await client.call(*ask))
        return stats
    finally:
        await client.aclose()


async def pool_revision(port: int) -> int:
    return int((await pool_stats(port))["revision"])


@attrs.define
class Workload:
    """What the clients do: how many, how many operations in all, over which users."""

    clients: int = 32
    operations: int = 20_000
    users: int = 24
    lose: float = 0.005  # share of ACTIVATEs whose connection is dropped before the reply
    seed: int = 1


async def record(port: int, workload: Workload) -> list[Operation]:
    """Run the workload against the server on ``port``; return every operation, in no order."""
    tokens = await pool_tokens(port)
    history: list[Operation] = []
    known: dict[str, str] = {}  # token id -> a lease id seen on it (maybe no longer current)
    budget = [workload.operations]
    kinds = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]

    async def client(n: int) -> None:
        rng = random.Random(workload.seed * 7919 + n)
        conn = await _Client.open(port)
        try:
            while budget[0] > 0:
                budget[0] -= 1
                kind = rng.choices(kinds, weights)[0]
                user = f"u{rng.randrange(workload.users)}"
                token = rng.choice(tokens)
                lease = known.get(token, "00000000-0000-4000-8000-000000000000")
                args: tuple[str, ...] = {
                    "activate": (user,),
                    "release": (token, user) if rng.random() < 0.5 else (token,),
                    "renew": (token, lease),
                    "validate": (token, lease),
                    "lease": (user,),
                    "token": (token,),
                    "history": (token, "LIMIT", "5"),
                    "clear": (),
                }[kind]
                op = Operation(n, kind, args, trio.current_time())
                history.append(op)
                try:
                    if kind == "activate" and rng.random() < workload.lose:
                        # Send, then drop the connection before the reply: outcome unknown.
                        await conn.stream.send_all(encode("ACTIVATE", *args))
                        await conn.aclose()
                        conn = await _reconnect(port)
                        continue
                    reply = await conn.call(kind.upper(), *args)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    # The server went away (a crash run): outcome unknown; wait for it.
                    await conn.aclose()
                    conn = await _reconnect(port)
                    continue
                op.completed = trio.current_time()
                _settle(op, reply)
                if op.ok and isinstance(op.value, dict) and "token_id" in op.value:
                    known[op.value["token_id"]] = op.value["id"]
                await trio.lowlevel.checkpoint()
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(workload.clients):
            nursery.start_soon(client, n)
    return history


def _settle(op: Operation, reply: Any) -> None:
    if isinstance(reply, hiredis.ReplyError):
        op.ok = False
        op.error = str(reply)
        op.value = op.error.split(" ", 1)[0]
        return
    op.ok = True
    if op.kind == "history":  # [cursor, [entries]]: the entries
        op.value = [_pairs(entry) for entry in reply[1]]
        return
    op.value = _pairs(reply)
    if op.kind in ("activate", "renew"):
        op.revision = int(op.value["revision"])
    elif op.kind == "release":
        op.revision = int(op.value)
    elif op.kind == "clear":
        op.revision = int(op.value["revision"])


def save(history: list[Operation], path: str) -> None:
    with open(path, "w") as f:
        for op in history:
            f.write(json.dumps(op.as_json()) + "\n")


def load(path: str) -> list[Operation]:
    with open(path) as f:
        return [Operation(**{**row, "args": tuple(row["args"])}) for row in map(json.loads, f)]
