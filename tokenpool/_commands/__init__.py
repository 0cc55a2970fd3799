"""The command layer: typed requests, one ``execute``, neutral results (sans-IO but
for the pools it drives).

Each transport (the RESP server, the HTTP API) builds requests straight from its
own wire format, asks the ``Gate`` whether the client may run them
(authentication, the admin user, rate limits), executes them here, and encodes
the result its own way. A file per command family:

- ``leases``: ACTIVATE, RELEASE, RENEW, VALIDATE, LEASE, CLEAR
- ``tokens``: TOKEN, TOKENS, SCAN
- ``history``: HISTORY, USERHISTORY
- ``pools``: STATS, POOL INFO/LIST/CREATE/ALTER/DROP
- ``transactions``: one actor batch for many requests (pipelines, EXEC)
- ``pubsub``: event channels
- ``connection``: clients, passwords, rate limits
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _trace
from ._base import ITEM_COST, SMALL_COST, PoolRequest, Request
from .connection import BusyError, Client, CommandSettings, Gate, NoAuthError, WrongPassError
from .history import History, UserHistory
from .leases import Activate, Clear, Cleared, Granted, LeaseOf, Release, Released, Renew, Validate
from .pools import AlterPool, CreatePool, DropPool, GetPool, GetStats, ListPools, PoolInfo
from .pubsub import parse_channel
from .tokens import Scan, Token, TokenIds, TokenInfo, TokenList, Tokens
from .transactions import MULTI_MAX, TX_COST, run_batch

if TYPE_CHECKING:
    from .._pool import Pools


class Commands:
    """Executes requests against a set of pools; one per server, every transport."""

    def __init__(self, pools: Pools, settings: CommandSettings) -> None:
        self.pools = pools
        self.settings = settings
        self.gate = Gate(settings)

    def client(self, peer: str, transport: str) -> Client:
        return Client(peer, transport, self.settings)

    async def execute(self, request: Request, client: Client, *, admitted: bool = False) -> Any:
        """Run one request: its neutral result, or raise its error (with its code).

        ``admitted``: the driver ran ``gate.admit`` already."""
        if not admitted:
            self.gate.admit(client, request)
        if isinstance(request, PoolRequest):
            core = self.pools.core(request.pool)
            if request.prepares:
                request.prepare(core)
            (result,) = await run_batch(core, [request])
            if isinstance(result, BaseException):
                raise result
            if request.completes:
                result = await request.complete(core, result)
            return result
        if _trace.on:  # a pool's creation, a report...: a span of its own
            (span,) = _trace.start_commands(getattr(request, "pool", ""), [request])
            try:
                result = await request.run(self.pools, client)
            except BaseException as error:
                _trace.end_commands([span], [error])
                raise
            _trace.end_commands([span], [result])
            return result
        return await request.run(self.pools, client)


__all__ = [
    "ITEM_COST",
    "MULTI_MAX",
    "SMALL_COST",
    "TX_COST",
    "Activate",
    "AlterPool",
    "BusyError",
    "Clear",
    "Cleared",
    "Client",
    "CommandSettings",
    "Commands",
    "CreatePool",
    "DropPool",
    "Gate",
    "GetPool",
    "GetStats",
    "Granted",
    "History",
    "LeaseOf",
    "ListPools",
    "NoAuthError",
    "PoolInfo",
    "PoolRequest",
    "Release",
    "Released",
    "Renew",
    "Request",
    "Scan",
    "Token",
    "TokenIds",
    "TokenInfo",
    "TokenList",
    "Tokens",
    "UserHistory",
    "Validate",
    "WrongPassError",
    "parse_channel",
    "run_batch",
]
