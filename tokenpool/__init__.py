"""tokenpool: finite pools of tokens leased to users for a limited time.

    async with tokenpool.open_pool(size=100, ttl=120.0) as pool:
        lease = await pool.activate("alice")

    async with tokenpool.connect("tokenpool://127.0.0.1:7379") as client:  # trio or asyncio
        lease = await client.pool("default").activate("alice")

Everything public is exported here; the underscored modules are private.
"""

from ._client import Client, Hold, RemotePool, connect
from ._clock import Clock
from ._commands.connection import BusyError
from ._errors import (
    Compacted,
    CompactedError,
    ExistsError,
    Full,
    FullError,
    InvalidArgument,
    InvalidArgumentError,
    LeaseLost,
    LeaseLostError,
    NoPermError,
    NotActive,
    NotActiveError,
    NotHolder,
    NotHolderError,
    NotKept,
    NotKeptError,
    PoolLocked,
    PoolLockedError,
    TokenPoolError,
    Unavailable,
    UnavailableError,
    UnknownPool,
    UnknownPoolError,
    UnknownToken,
    UnknownTokenError,
    Unreachable,
    UnreachableError,
)
from ._model import Event, Lease, Page, Reason, Stats, Status, TokenStatus, Usage
from ._ops import (
    Activate,
    ActivateMany,
    Clear,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    Op,
    Release,
    Renew,
    Validate,
)
from ._pool import Pool, Pools, PoolStatistics, open_pool, open_pools
from ._settings import PoolSettings

__version__ = "0.2.0"

__all__ = [
    "Activate",
    "ActivateMany",
    "BusyError",
    "Clear",
    "Client",
    "Clock",
    "Compacted",
    "CompactedError",
    "Event",
    "ExistsError",
    "Full",
    "FullError",
    "GetLease",
    "GetStats",
    "GetToken",
    "GetTokens",
    "Hold",
    "InvalidArgument",
    "InvalidArgumentError",
    "Lease",
    "LeaseLost",
    "LeaseLostError",
    "NoPermError",
    "NotActive",
    "NotActiveError",
    "NotHolder",
    "NotHolderError",
    "NotKept",
    "NotKeptError",
    "Op",
    "Page",
    "Pool",
    "PoolLocked",
    "PoolLockedError",
    "PoolSettings",
    "PoolStatistics",
    "Pools",
    "Reason",
    "Release",
    "RemotePool",
    "Renew",
    "Stats",
    "Status",
    "TokenPoolError",
    "TokenStatus",
    "Unavailable",
    "UnavailableError",
    "UnknownPool",
    "UnknownPoolError",
    "UnknownToken",
    "UnknownTokenError",
    "Unreachable",
    "UnreachableError",
    "Usage",
    "Validate",
    "__version__",
    "connect",
    "open_pool",
    "open_pools",
]
