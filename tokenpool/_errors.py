"""One error hierarchy for the library, the RESP server and the HTTP API.

Every error carries a stable short ``code``: the RESP server sends it as the
first word of an error reply (``-NOTHOLDER ...``) and the HTTP API puts it in
its JSON body, so clients branch on the code and show the message to people.
Each class also has the short name the issues use (``UnknownToken``...) as an
alias, so both spellings import.
"""

from __future__ import annotations

from typing import ClassVar


class TokenPoolError(Exception):
    """Base of every error tokenpool raises on purpose."""

    code: ClassVar[str] = "ERR"


class InvalidArgumentError(TokenPoolError, ValueError):
    """An argument or setting is malformed or out of range: the message names it and why."""

    code = "INVALID"


class UnknownTokenError(TokenPoolError, LookupError):
    """The token id is well formed but no token of this pool has it."""

    code = "UNKNOWN"


class UnknownPoolError(TokenPoolError, LookupError):
    """No pool of that name is served here."""

    code = "UNKNOWN"


class ExistsError(TokenPoolError):
    """A pool of that name already exists."""

    code = "EXISTS"


class NotHolderError(TokenPoolError):
    """The caller does not hold the lease it acts on (another user, or a lease that ended)."""

    code = "NOTHOLDER"


class NotActiveError(TokenPoolError):
    """The token has no active lease to act on."""

    code = "NOTACTIVE"


class FullError(TokenPoolError):
    """Every token is held and the pool's policy refuses the activation.

    Raised by ``reject`` pools, by ``evict`` pools whose every lease is younger
    than ``min_hold``, and by ``wait`` pools when the wait ran out (or none was asked).
    """

    code = "FULL"


class UnavailableError(TokenPoolError):
    """The pool cannot take the change now (store backlog full, store down, pool closed).

    Reads keep working while this is raised; retry later.
    """

    code = "UNAVAILABLE"


class PoolLockedError(TokenPoolError):
    """Another process owns this pool (or this SQLite file)."""

    code = "LOCKED"


class MovedError(TokenPoolError):
    """(cluster) The pool's hash slot is owned by another node: the message is Redis
    Cluster's ``<slot> <host>:<port>``, so every cluster client follows it."""

    code = "MOVED"

    @property
    def address(self) -> str:
        """The ``<host>:<port>`` the message names."""
        return str(self).partition(" ")[2]


class TryAgainError(TokenPoolError):
    """(cluster) This node is taking the pool's slot over and is not serving it yet."""

    code = "TRYAGAIN"


class ClusterDownError(TokenPoolError):
    """(cluster) No node serves the pool's slot now (its owner failed and no other node
    took it over yet), or cluster mode is off on this server."""

    code = "CLUSTERDOWN"


class CompactedError(TokenPoolError):
    """``watch(since=...)`` asked for events older than the oldest one still kept."""

    code = "COMPACTED"

    def __init__(self, message: str, oldest: int) -> None:
        super().__init__(message)
        self.oldest = oldest


class NotKeptError(TokenPoolError, LookupError):
    """What was asked for is not kept here: usage analytics of a memory-only server (it
    keeps no history), or the series of a pool past the ones sampled."""

    code = "NOTKEPT"


class NoPermError(TokenPoolError):
    """The client is authenticated but may not run this command (admin commands)."""

    code = "NOPERM"


class LeaseLostError(NotHolderError):
    """(client) ``hold()`` lost its lease while the block ran, and cancelled the block.

    ``cause`` says how: ``NotHolderError`` (evicted, released elsewhere, cleared,
    expired), ``UnavailableError`` (the server refused to renew), or
    ``UnreachableError`` (the lease's ``expires_at`` passed with no renewal).
    ``lease`` is the last lease the holder had.
    """

    def __init__(self, message: str, lease: object, cause: BaseException) -> None:
        super().__init__(message)
        self.lease = lease
        self.cause = cause


class UnreachableError(TokenPoolError, ConnectionError):
    """(client) The server could not be reached, or did not answer in time.

    Raised by ``tokenpool.connect``'s pools when no connection could be made or
    kept, or a reply did not come within the client's ``timeout``. Whether a
    request that was sent took effect is then unknown (see the client's retries).
    """

    code = "UNREACHABLE"


def lone_error(error: BaseException) -> BaseException:
    """The one exception inside nested single-member groups, else ``error`` itself.

    trio's nurseries wrap even a lone exception in a group; a library user who
    raised ``KeyError`` inside ``async with open_pool()`` should get ``KeyError``,
    and the CLI should name a port in use, not a group.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


InvalidArgument = InvalidArgumentError
UnknownToken = UnknownTokenError
UnknownPool = UnknownPoolError
NotHolder = NotHolderError
NotActive = NotActiveError
Full = FullError
Unavailable = UnavailableError
PoolLocked = PoolLockedError
Moved = MovedError
TryAgain = TryAgainError
ClusterDown = ClusterDownError
Compacted = CompactedError
Unreachable = UnreachableError
NotKept = NotKeptError
LeaseLost = LeaseLostError
