"""An open-loop RESP load generator: requests at a constant rate, whatever the replies do.

A closed-loop tool (redis-benchmark) sends the next request only when the last
reply came, so a server that stalls also stops the clock that measures it
(coordinated omission). Here request ``i`` is due at ``start + i / rate``; it is
sent then on connection ``i % connections`` (pipelining behind earlier ones if
they are still out), and its latency runs from when it was *due*, not from when
it went out. hiredis parses the replies.
"""

from __future__ import annotations

import random
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable

import attrs
import hiredis


@attrs.frozen
class OpenLoopRun:
    """What an open-loop run offered and what came back (latencies in ms)."""

    offered: float
    rps: float  # achieved
    p50: float
    p99: float
    p999: float
    max: float
    errors: int
    unanswered: int
    late_p99: float  # the generator's own lateness: a request queued this long after due

    @property
    def refused(self) -> int:
        return self.errors + self.unanswered


class _Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.reader = hiredis.Reader()
        self.due: deque[float] = deque()
        self.out = bytearray()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def open_loop(
    port: int,
    request: Callable[[random.Random], bytes],
    *,
    rate: float,
    seconds: float,
    connections: int = 50,
    drain: float = 5.0,
) -> OpenLoopRun:
    """Offer ``rate`` requests/s for ``seconds``; wait up to ``drain`` s for the last replies."""
    rng = random.Random(1)
    conns = [_Conn(port) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    total = int(rate * seconds)
    latencies: list[float] = []
    lateness: list[float] = []
    errors = 0
    sent = 0
    clock = time.perf_counter
    start = clock() + 0.05
    try:
        while len(latencies) + errors < total:
            now = clock()
            if now > start + seconds + drain:
                break
            due = min(total, int((now - start) * rate) + 1) if now >= start else 0
            while sent < due:
                conn = conns[sent % connections]
                conn.out += request(rng)
                due_at = start + sent / rate
                conn.due.append(due_at)
                lateness.append(now - due_at)
                sent += 1
            for conn in conns:
                if conn.out:
                    try:
                        n = conn.sock.send(conn.out)
                    except BlockingIOError:
                        n = 0
                    del conn.out[:n]
            wait = start + sent / rate - clock() if sent < total else 0.01
            for key, _ in selector.select(max(0.0, min(wait, 0.01))):
                conn = key.data
                data = conn.sock.recv(1 << 16)
                if not data:
                    raise RuntimeError("the server closed a connection of the load generator")
                conn.reader.feed(data)
                arrived = clock()
                while (reply := conn.reader.gets()) is not False:
                    due_at = conn.due.popleft()
                    if isinstance(reply, hiredis.ReplyError):
                        errors += 1
                    else:
                        latencies.append((arrived - due_at) * 1000)
        elapsed = clock() - start
    finally:
        for conn in conns:
            conn.sock.close()
        selector.close()
    latencies.sort()
    lateness.sort()
    return OpenLoopRun(
        offered=rate,
        rps=len(latencies) / elapsed if elapsed > 0 else 0.0,
        p50=_percentile(latencies, 50),
        p99=_percentile(latencies, 99),
        p999=_percentile(latencies, 99.9),
        max=latencies[-1] if latencies else float("nan"),
        errors=errors,
        unanswered=total - len(latencies) - errors,
        late_p99=_percentile(lateness, 99) * 1000,
    )
