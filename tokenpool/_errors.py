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
    """An argument is malformed: the message names the argument and why."""

    code = "INVALID"


class UnknownTokenError(TokenPoolError, LookupError):
    """The token id is well formed but no token of this pool has it."""

    code = "UNKNOWN"


class NotHolderError(TokenPoolError):
    """The caller does not hold the lease it acts on (another user, or a lease that ended)."""

    code = "NOTHOLDER"


class NotActiveError(TokenPoolError):
    """The token has no active lease to act on."""

    code = "NOTACTIVE"


class UnavailableError(TokenPoolError):
    """The pool cannot take the change now (store backlog full, store down, pool closed).

    Reads keep working while this is raised; retry later.
    """

    code = "UNAVAILABLE"


class PoolLockedError(TokenPoolError):
    """Another process owns this pool in this database."""

    code = "LOCKED"


InvalidArgument = InvalidArgumentError
UnknownToken = UnknownTokenError
NotHolder = NotHolderError
NotActive = NotActiveError
Unavailable = UnavailableError
PoolLocked = PoolLockedError
