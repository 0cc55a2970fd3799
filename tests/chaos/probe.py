"""A well-behaved client in a process of its own: ``python -m tests.chaos.probe PORT [fresh]``.

Sends PING every 20 ms on one connection until its stdin closes, then prints
``[sent, round trip]`` per PING (wall-clock seconds, seconds; one JSON list), so a run
can tell which of its phases a slow PING fell in. Being its own process, its timings are
the server's, not those of a load generator's busy event loop. With ``fresh``, each PING
is sent on a new connection and its round trip includes the connect: a server out of
file descriptors, or not accepting, shows there.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time


def _ping(sock: socket.socket) -> None:
    sock.sendall(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(100)
        if not chunk:
            raise OSError("closed")
        reply += chunk


def main(port: int, every: float = 0.02, fresh: bool = False) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while not select.select([sys.stdin], [], [], every)[0]:
            sent = time.time()
            started = time.perf_counter()
            try:
                if fresh:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as new:
                        _ping(new)
                else:
                    _ping(sock)
            except OSError:
                out.append((sent, float("inf")))
                if fresh:
                    continue
                break
            out.append((sent, time.perf_counter() - started))
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), fresh=sys.argv[2:] == ["fresh"])))
