"""The client library: the library's pool API over RESP, on anyio (trio and asyncio).

    async with tokenpool.connect("tokenpool://127.0.0.1:7379") as client:
        pool = client.pool("gpu")
        async with pool.hold("alice") as held:
            ...  # the lease is renewed meanwhile; the block is cancelled if it is lost

address.py     the URL: host, port, TLS, user and password
connection.py  one connection: a write lock, a FIFO of reply slots, one reader task
connections.py the bounded pool of connections, pipelining, timeouts, retries
replies.py     RESP replies as the library's values and errors
remote.py      connect(), Client (pools' management), RemotePool (the Pool API)
watch.py       watch(): SUBSCRIBE on a connection of its own, resumed after reconnects
hold.py        hold(): activate, renew in the background, cancel the block when lost
"""

from .hold import Hold
from .remote import Client, ClientStatistics, RemotePool, connect
from .watch import EventStream

__all__ = ["Client", "ClientStatistics", "EventStream", "Hold", "RemotePool", "connect"]
