"""Hostile and broken clients against a running server: it stays up, the others are
served, its memory and file descriptors stay bounded.

- ``NEGATIVE``: Redis's own negative protocol cases (unbalanced multibulk, wrong
  and negative lengths, huge counts, an HTTP request on the RESP port), each on a
  connection of its own, each answered with a protocol error and a close.
- ``random_bytes``: many connections sending random bytes and RESP-shaped garbage.
- ``slowloris``: many connections sending a byte a second, each of which must be
  dropped within the per-command deadline of its first byte.
- The second round: many pools and a ``/metrics`` scrape, many ``PSUBSCRIBE`` patterns
  over them, one connection subscribing to channels (replays) past the bound of 1,000,
  waiters that give up, and a ``CLEAR`` of many leases.
"""

from __future__ import annotations

import contextlib
import random

import attrs
import trio

from tokenpool._resp import encode_command as encode

from .history import _Client, call_many

# (name, payload, what the reply must start with; None: a close with no reply is fine)
NEGATIVE: list[tuple[str, bytes, bytes | None]] = [
    ("huge multibulk count", b"*3000000000\r\n", b"-ERR Protocol error"),
    ("multibulk count past the limit", b"*20000000\r\n", b"-ERR Protocol error"),
    ("huge bulk length", b"*1\r\n$3000000000\r\n", b"-ERR Protocol error"),
    ("bulk length past the limit", b"*1\r\n$20000000\r\n", b"-ERR Protocol error"),
    ("negative bulk length", b"*1\r\n$-10\r\n", b"-ERR Protocol error"),
    ("bulk length not a number", b"*1\r\n$blabla\r\n", b"-ERR Protocol error"),
    ("multibulk count not a number", b"*blabla\r\n", b"-ERR Protocol error"),
    ("bulk without a $", b"*1\r\nfoo\r\n", b"-ERR Protocol error"),
    ("bulk longer than said", b"*1\r\n$3\r\nPINGX\r\n", b"-ERR Protocol error"),
    ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"-ERR"),
    ("a POST with a body", b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"-ERR"),
    ("non-UTF-8 argument", b"*2\r\n$4\r\nECHO\r\n$2\r\n\xff\xfe\r\n", b"-ERR Protocol error"),
    ("inline line past 64 KiB", b"PING " + b"a" * 70_000 + b"\r\n", b"-ERR Protocol error"),
    ("33 arguments", b"*33\r\n" + b"$1\r\na\r\n" * 33, b"-ERR Protocol error"),
]


@attrs.frozen
class Outcome:
    name: str
    reply: bytes
    closed: bool


async def _exchange(port: int, payload: bytes, seconds: float) -> tuple[bytes, bool]:
    """Send ``payload``; collect what comes back until close or ``seconds``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    closed = False
    async with stream:
        try:
            await stream.send_all(payload)
            with trio.move_on_after(seconds):
                while chunk := await stream.receive_some(65536):
                    data += chunk
                closed = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            closed = True
    return data, closed


async def negative(port: int, seconds: float = 5.0) -> list[Outcome]:
    """Every case of ``NEGATIVE``, each on a fresh connection."""
    out = []
    for name, payload, _ in NEGATIVE:
        reply, closed = await _exchange(port, payload, seconds)
        out.append(Outcome(name, reply, closed))
    return out


def _garbage(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    if choice == 1:
        return b"*%d\r\n" % rng.choice([-1, 0, 1, 33, 2**31, 10**12])
    if choice == 2:
        return b"*2\r\n$%d\r\n" % rng.choice([-5, 0, 3, 70_000, 2**40]) + rng.randbytes(8)
    if choice == 3:
        return b"GET /%s HTTP/1.1\r\n\r\n" % rng.randbytes(4).hex().encode()
    return bytes(rng.choice(b"*$:+-\r\n0123456789abc ") for _ in range(rng.randrange(1, 200)))


async def random_bytes(port: int, connections: int, rounds: int, seed: int = 1) -> int:
    """``connections`` clients each sending up to ``rounds`` chunks of garbage.

    Returns how many connections the server closed (a protocol error closes one).
    """
    closed = 0

    async def one(n: int) -> None:
        nonlocal closed
        rng = random.Random(seed * 10_007 + n)
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return
        async with stream:
            try:
                for _ in range(rounds):
                    await stream.send_all(_garbage(rng))
                    with trio.move_on_after(0.2):
                        if not await stream.receive_some(65536):
                            closed += 1
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                closed += 1

    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(one, n)
    return closed


async def slowloris(port: int, connections: int, deadline: float) -> list[float]:
    """Each connection starts a command, then sends one byte a second.

    Returns, per connection, seconds from its first byte until the server closed it
    (``inf`` if it was still open after ``deadline`` plus 5 s).
    """
    out: list[float] = []
    payload = b"*2\r\n$4\r\nPING\r\n$100\r\n" + b"x" * 100

    async def one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            first = trio.current_time()
            try:
                with trio.move_on_after(deadline + 5):
                    for byte in payload:
                        await stream.send_all(bytes([byte]))
                        with trio.move_on_after(1.0):
                            if not await stream.receive_some(1024):
                                out.append(trio.current_time() - first)
                                return
                out.append(float("inf"))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                out.append(trio.current_time() - first)

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(one)
    return out


async def ping(port: int) -> bool:
    """Whether a well-behaved client is served."""
    try:
        with trio.fail_after(5):
            reply, _ = await _exchange(port, b"PING\r\n", 0.5)
    except (OSError, trio.TooSlowError):
        return False
    return reply.startswith(b"+PONG")


async def ping_latencies(port: int, until: trio.Event, every: float = 0.02) -> list[float]:
    """PING round trips on one connection, every ``every`` seconds until ``until`` is set
    (``inf`` for one that failed): how long another client's abuse made it wait."""
    out: list[float] = []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        while not until.is_set():
            started = trio.current_time()
            try:
                with trio.fail_after(5):
                    await stream.send_all(b"PING\r\n")
                    reply = b""
                    while not reply.endswith(b"\r\n"):
                        chunk = await stream.receive_some(100)
                        if not chunk:
                            raise trio.BrokenResourceError
                        reply += chunk
                out.append(trio.current_time() - started)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                out.append(float("inf"))
                return out
            await trio.sleep(every)
    return out


async def large_replies(port: int, connections: int, pipeline: int, seconds: float) -> int:
    """Small pipelines asking for the largest replies there are (every token, the longest
    history page, a full SCAN page, the largest transaction allowed and one past it),
    from clients that never read (and one that reads slowly). Returns the bytes the
    slow reader got: the server kept serving it."""
    requests = [
        b"TOKENS\r\n",
        b"SCAN 0 COUNT 1000\r\n",
        b"TOKENS CURSOR 0 COUNT 1000\r\n",
        b"POOL INFO default\r\n",
        b"USERHISTORY nobody LIMIT 10000\r\n",
        b"MULTI\r\nTOKENS CURSOR 0 COUNT 700\r\nEXEC\r\n",
        b"MULTI\r\n" + b"TOKENS\r\n" * 64 + b"EXEC\r\n",
    ]
    received = 0

    async def silent(n: int) -> None:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return
        async with stream:
            with (
                trio.move_on_after(seconds),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await stream.send_all(requests[n % len(requests)] * pipeline)
                await trio.sleep_forever()

    async def slow() -> None:
        nonlocal received
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with (
                trio.move_on_after(seconds),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await stream.send_all(b"TOKENS\r\n" * pipeline)
                while chunk := await stream.receive_some(4096):
                    received += len(chunk)
                    await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        for n in range(connections):
            nursery.start_soon(silent, n)
    return received


# -- the second round (issue 18): subscriptions, waits, big clears, many pools --


async def _open(port: int) -> _Client:
    return await _Client.open(port)


async def many_pools(port: int, pools: int) -> int:
    """``POOL CREATE`` of ``pools`` small pools (pipelined); how many were created."""
    client = await _open(port)
    try:
        created = 0
        for first in range(0, pools, 100):
            batch = [
                ("POOL", "CREATE", f"p{n}", "SIZE", "2", "TTL", "60")
                for n in range(first, min(pools, first + 100))
            ]
            created += sum(1 for r in await call_many(client, batch) if r == "OK")
        # An event in each, for the patterns to forward.
        await call_many(client, [("TP.ACTIVATE", f"p{n}", "u") for n in range(pools)])
        return created
    finally:
        await client.aclose()


async def scrape_metrics(http_port: int) -> tuple[int, float]:
    """One ``GET /metrics``: its size in bytes and how long it took."""
    begun = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", http_port)
    data = b""
    async with stream:
        await stream.send_all(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        with trio.move_on_after(30):
            while chunk := await stream.receive_some(65536):
                data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/metrics answered {data[:80]!r}")
    return len(data), trio.current_time() - begun


async def subscriptions(port: int, channels: int, pool: str, revision: int) -> tuple[int, str]:
    """One connection subscribing to ``channels`` channels ``events:<pool>@<rev>`` (each a
    replay of up to ``channels`` events), 30 a command. Returns how many were taken and
    the first refusal's text."""
    client = await _open(port)
    taken = 0
    try:
        for first in range(0, channels, 30):
            names = [
                f"events:{pool}@{max(0, revision - n)}"
                for n in range(first, min(channels, first + 30))
            ]
            await client.stream.send_all(encode("SUBSCRIBE", *names))
            # One reply per channel taken; a refusal is one error for the whole command.
            got = 0
            while got < len(names):
                reply = client.reader.gets()
                if reply is False:
                    with trio.fail_after(10):
                        data = await client.stream.receive_some(65536)
                    if not data:
                        return taken, "closed"
                    client.reader.feed(data)
                    continue
                if isinstance(reply, Exception):
                    return taken, str(reply)
                if isinstance(reply, list) and reply and reply[0] == "subscribe":
                    got += 1
                    taken += 1
        return taken, ""
    finally:
        await client.aclose()


async def patterns(port: int, count: int, pools: int) -> tuple[int, str]:
    """One connection with ``count`` PSUBSCRIBE patterns each matching many of ``pools``
    pools (``events:p1*``, ``events:p2*``, ... and ``events:*``). Returns how many were
    taken and the first refusal's text."""
    names = ["events:*"] + [f"events:p{n}*" for n in range(1, count)]
    client = await _open(port)
    taken = 0
    try:
        for first in range(0, len(names), 30):
            chunk = names[first : first + 30]
            await client.stream.send_all(encode("PSUBSCRIBE", *chunk))
            got = 0
            while got < len(chunk):
                reply = client.reader.gets()
                if reply is False:
                    with trio.fail_after(10):
                        data = await client.stream.receive_some(65536)
                    if not data:
                        return taken, "closed"
                    client.reader.feed(data)
                    continue
                if isinstance(reply, Exception):
                    return taken, str(reply)
                if isinstance(reply, list) and reply and reply[0] == "psubscribe":
                    got += 1
                    taken += 1
        # Events in every pool while the patterns are held (and this client reads none).
        other = await _open(port)
        try:
            await call_many(other, [("TP.ACTIVATE", f"p{n}", "v") for n in range(pools)])
        finally:
            await other.aclose()
        return taken, ""
    finally:
        await client.aclose()


async def waiters_giving_up(port: int, count: int) -> int:
    """``count`` clients wait on a full pool (``WHEN-FULL wait``): half with a short WAIT
    that runs out, half hanging up mid-wait; then the holder releases and a new client
    must be granted at once. Returns how many short waits were answered."""
    admin = await _open(port)
    answered = 0
    try:
        await admin.call("POOL", "CREATE", "waitq", "SIZE", "1", "TTL", "60", "WHEN-FULL", "wait")
        lease = await admin.call("TP.ACTIVATE", "waitq", "holder")

        async def short(n: int) -> None:
            nonlocal answered
            client = await _open(port)
            try:
                with trio.fail_after(30):
                    await client.call("TP.ACTIVATE", "waitq", f"s{n}", "WAIT", "0.5")
                answered += 1
            finally:
                await client.aclose()

        async def hang_up(n: int) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(encode("TP.ACTIVATE", "waitq", f"h{n}", "WAIT", "300"))
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(short if n % 2 else hang_up, n)
        holder = dict(zip(lease[::2], lease[1::2], strict=True))
        released = await admin.call("TP.RELEASE", "waitq", holder["token_id"], "holder")
        if not isinstance(released, int):
            raise RuntimeError(f"the holder's RELEASE answered {released!r}")
        with trio.fail_after(5):
            granted = await admin.call("TP.ACTIVATE", "waitq", "after", "WAIT", "1")
        if not isinstance(granted, list):
            raise RuntimeError(f"after the waiters gave up, ACTIVATE answered {granted!r}")
        return answered
    finally:
        await admin.aclose()


async def big_clear(port: int, leases: int) -> tuple[int, float]:
    """A pool of ``leases`` tokens, every one leased (pipelined), then one ``CLEAR``:
    how many it ended and how long its answer took."""
    client = await _open(port)
    try:
        await client.call("POOL", "CREATE", "big", "SIZE", str(leases), "TTL", "600")
        for first in range(0, leases, 1000):
            batch = [
                ("TP.ACTIVATE", "big", f"u{n}") for n in range(first, min(leases, first + 1000))
            ]
            await call_many(client, batch)
        begun = trio.current_time()
        reply = await client.call("TP.CLEAR", "big")
        took = trio.current_time() - begun
        fields = dict(zip(reply[::2], reply[1::2], strict=True))
        return int(fields["cleared"]), took
    finally:
        await client.aclose()
