"""The command layer with hostile arguments, through the server's own pipeline code (no socket).

Every reply to any command with any arguments is a documented reply or a documented
error code, never an internal error, and a refused command changes nothing.
"""

from __future__ import annotations

from typing import Any

import attrs
import hiredis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenpool
from tokenpool._commands import CommandSettings
from tokenpool._server import RespServer, RespSettings
from tokenpool._server.argv import BY_NAME, KEYED
from tokenpool._server.session import CONNECTION as CONNECTION_COMMANDS
from tokenpool._server.session import Session

COMMANDS = set(BY_NAME) | set(KEYED) | set(CONNECTION_COMMANDS)

DOCUMENTED = {
    "ERR",
    "NOAUTH",
    "WRONGPASS",
    "INVALID",
    "UNKNOWN",
    "NOTHOLDER",
    "NOTACTIVE",
    "UNAVAILABLE",
    "NOPROTO",
    "FULL",
    "EXISTS",
    "NOPERM",
    "EXECABORT",
    "CROSSSLOT",
    "NOTKEPT",
}
# Commands whose effect is on the connection or the set of pools, not the pool's state.
CONNECTION = {"AUTH", "HELLO", "QUIT", "RESET", "CLIENT", "SELECT", "MULTI", "EXEC", "DISCARD"}

KEYWORDS = [
    "LIMIT",
    "BEFORE",
    "COUNT",
    "CURSOR",
    "MATCH",
    "WAIT",
    "SIZE",
    "TTL",
    "WHEN-FULL",
    "MIN-HOLD",
    "MAX-LIFETIME",
    "CREATE",
    "ALTER",
    "USE",
    "LIST",
    "INFO",
    "DROP",
    "GET",
    "SET",
    "SETNAME",
    "AUTH",
    "evict",
    "reject",
    "wait",
    "default",
    "admin",
    "alice",
    "events:default",
    "events:*",
    "events:default@1",
    "*",
]
NUMBERS = [
    "",
    " ",
    "\t",
    "²",
    "٣",
    "1_0",
    "0x10",
    "+5",
    "-1",
    "0",
    "1",
    "10",
    "1e3",
    "inf",
    "nan",
    "NaN",
    "1e-7",
    "1e300",
    "9" * 30,
    "9" * 5000,
    "0.5",
    "-0",
    "00",
    "\x00",
    "\r\n",
]
# $TOKEN, $LEASE and $FREE are replaced, when the commands run, by the held token's id,
# its lease's id and a free token's id: the commands reach live state, not only parsing.
IDS = [
    "$TOKEN",
    "$LEASE",
    "$FREE",
    "holder",
    "00000000-0000-4000-8000-000000000000",
    "not-a-uuid",
    "é" * 70,
    "'",
    '"',
    "a b",
]
hostile_text = st.one_of(
    st.sampled_from(KEYWORDS), st.sampled_from(NUMBERS), st.sampled_from(IDS), st.text(max_size=8)
)
value = st.one_of(st.sampled_from(NUMBERS), hostile_text)
ident = st.one_of(st.sampled_from(IDS), hostile_text)


def shaped(name: str, *slots: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """A command with its arguments in the shape it parses, any values in the slots."""
    return st.tuples(*slots).map(lambda parts: [name, *(x for part in parts for x in part)])


def option(*keys: str) -> st.SearchStrategy[list[str]]:
    return st.lists(st.tuples(st.sampled_from(keys), value), max_size=3).map(
        lambda pairs: [x for pair in pairs for x in pair]
    )


one = ident.map(lambda x: [x])
pool_options = option("SIZE", "TTL", "WHEN-FULL", "MIN-HOLD", "MAX-LIFETIME")
command = st.one_of(
    shaped("HISTORY", one, option("LIMIT", "BEFORE")),
    shaped("USERHISTORY", one, option("LIMIT", "BEFORE")),
    shaped("TOKENS", option("CURSOR", "COUNT")),
    shaped("SCAN", value.map(lambda x: [x]), option("COUNT", "MATCH")),
    shaped("ACTIVATE", one, option("WAIT")),
    shaped("TP.ACTIVATE", st.sampled_from(["default", "other", "x y"]).map(lambda x: [x]), one),
    shaped("TP.RELEASE", st.sampled_from(["default", "nope"]).map(lambda x: [x]), one),
    shaped("POOL", st.sampled_from(["CREATE", "ALTER"]).map(lambda x: [x]), one, pool_options),
    shaped("POOL", st.sampled_from(["USE", "INFO", "DROP", "LIST"]).map(lambda x: [x]), one),
    shaped("RENEW", one, one),
    st.tuples(st.sampled_from(["VALIDATE", "RELEASE", "TOKEN", "LEASE", "ECHO"]), one, one).map(
        lambda t: [t[0], *t[1], *t[2]]
    ),
    st.tuples(
        st.sampled_from(["SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "CONFIG", "CLIENT", "HELLO"]),
        st.lists(value, max_size=3),
    ).map(lambda t: [t[0], *t[1]]),
    st.tuples(
        st.one_of(st.sampled_from(sorted(COMMANDS)), st.text(min_size=1, max_size=8)),
        st.lists(hostile_text, max_size=5),
    ).map(lambda t: [t[0], *t[1]]),
)
commands = st.lists(command, min_size=1, max_size=20)


class _Sink:
    """What a connection would send, kept in memory."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sent: list[bytes] = []
        self.closed = False
        self.hung_up = False
        self.nursery: Any = None

    async def watch_hangup(self, scope: trio.CancelScope) -> None:
        await trio.sleep_forever()  # a client that stays

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    def follow(self, name: str, pattern: bool, shard: bool = False) -> trio.CancelScope:
        return trio.CancelScope()


def replies_of(data: bytes) -> list[Any]:
    reader = hiredis.Reader(encoding="utf-8", errors="replace")
    reader.feed(data)
    out = []
    while (reply := reader.gets()) is not False:
        out.append(reply)
    return out


def codes(reply: Any) -> list[str]:
    if isinstance(reply, hiredis.ReplyError):
        return [str(reply).split(" ", 1)[0]]
    if isinstance(reply, list):
        return [c for item in reply for c in codes(item)]
    return []


def texts(reply: Any) -> list[str]:
    if isinstance(reply, hiredis.ReplyError):
        return [str(reply)]
    if isinstance(reply, list):
        return [t for item in reply for t in texts(item)]
    return []


async def run_commands(argvs: list[list[str]]) -> None:
    async with tokenpool.open_pools(
        declared={"default": tokenpool.PoolSettings(size=3, ttl=60)}
    ) as pools:
        server = RespServer(
            pools,
            RespSettings(
                port=0, commands=CommandSettings(password=None, auth_delay=0.0, auth_rate=1e6)
            ),
        )
        pool = pools.get("default")
        lease = await pool.activate("holder")
        free = next(t.id for t in await pool.tokens() if t.id != lease.token_id)
        live = {"$TOKEN": lease.token_id, "$LEASE": lease.id, "$FREE": free}
        argvs = [[live.get(a, a) for a in argv] for argv in argvs]
        session = Session(1, server.commands.client("127.0.0.1:1", "resp"))
        sink = _Sink(session)
        server._by_session[1] = sink  # type: ignore[assignment]
        for argv in argvs:
            before = pool.statistics().stats
            sink.sent.clear()
            with trio.fail_after(5):
                await server._execute(sink, [argv])  # type: ignore[arg-type]
            replies = replies_of(b"".join(sink.sent))
            found = [c for r in replies for c in codes(r)]
            assert set(found) <= DOCUMENTED, (argv, found)
            assert not any("internal error" in t for r in replies for t in texts(r)), argv
            name = argv[0].upper()
            refused = len(replies) == 1 and isinstance(replies[0], hiredis.ReplyError)
            if refused and name not in CONNECTION:
                after = pool.statistics().stats
                # A refused activation counts in refusals (by design); nothing else moves.
                assert attrs.evolve(before, refusals=0, waiting=0) == attrs.evolve(
                    after, refusals=0, waiting=0
                ), argv
            if "default" not in pools:
                break
            if session.quit:
                session = Session(1, server.commands.client("127.0.0.1:1", "resp"))
                sink = _Sink(session)
                server._by_session[1] = sink  # type: ignore[assignment]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cmds=commands)
def test_any_arguments_get_a_documented_reply_and_a_refusal_changes_nothing(
    cmds: list[list[str]],
) -> None:
    trio.run(run_commands, cmds)


def test_the_hot_path_builds_activate_and_its_op_as_their_init_does() -> None:
    """RESP's ACTIVATE and its op are made without ``__init__`` (a Python frame less each):
    every field must still be set as ``__init__`` sets it (an unset slot fails here)."""
    from tokenpool import _ops
    from tokenpool._commands.leases import Activate
    from tokenpool._server.argv import build

    fast = build("ACTIVATE", ["ACTIVATE", "alice"], "wt")
    assert fast == Activate("wt", "alice")
    assert fast._fields() == Activate("wt", "alice")._fields()
    assert build("TP.ACTIVATE", ["TP.ACTIVATE", "wt", "alice"], "default") == fast
    op = fast.op()
    slow = _ops.Activate("alice", None)
    assert type(op) is type(slow)
    assert [getattr(op, n) for n in slow.__slots__] == [getattr(slow, n) for n in slow.__slots__]
