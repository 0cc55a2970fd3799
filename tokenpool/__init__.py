"""tokenpool: a finite pool of tokens leased to users for a limited time.

    async with tokenpool.open_pool(size=100, ttl=120.0) as pool:
        lease = await pool.activate("alice")

Everything public is exported here; the underscored modules are private.
"""

from ._clock import Clock
from ._errors import (
    InvalidArgument,
    InvalidArgumentError,
    NotActive,
    NotActiveError,
    NotHolder,
    NotHolderError,
    PoolLocked,
    PoolLockedError,
    TokenPoolError,
    Unavailable,
    UnavailableError,
    UnknownToken,
    UnknownTokenError,
)
from ._model import Lease, Reason, Stats, Status, TokenStatus, Usage
from ._ops import (
    Activate,
    ActivateMany,
    Clear,
    GetHistory,
    GetLease,
    GetStats,
    GetToken,
    GetTokens,
    Op,
    Release,
    Renew,
    Validate,
)
from ._pool import Pool, open_pool

__version__ = "0.1.0"

__all__ = [
    "Activate",
    "ActivateMany",
    "Clear",
    "Clock",
    "GetHistory",
    "GetLease",
    "GetStats",
    "GetToken",
    "GetTokens",
    "InvalidArgument",
    "InvalidArgumentError",
    "Lease",
    "NotActive",
    "NotActiveError",
    "NotHolder",
    "NotHolderError",
    "Op",
    "Pool",
    "PoolLocked",
    "PoolLockedError",
    "Reason",
    "Release",
    "Renew",
    "Stats",
    "Status",
    "TokenPoolError",
    "TokenStatus",
    "Unavailable",
    "UnavailableError",
    "UnknownToken",
    "UnknownTokenError",
    "Usage",
    "Validate",
    "__version__",
    "open_pool",
]
