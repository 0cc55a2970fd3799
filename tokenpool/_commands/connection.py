"""Who is asking, and whether they may: clients, passwords and rate limits.

These are steps every transport takes before it executes a request, not
commands: the RESP driver runs them for ``AUTH``/``HELLO`` and each command,
the HTTP driver for each request's bearer and route.

Passwords: a failed attempt is counted once (under the transport it came on),
answered after ``delay``, and spends one unit of its client address's budget
(a token bucket shared by every transport): past it, attempts from that
address are refused unchecked, so many connections guess no faster than one.
A correct password is never counted as a failure, whichever user it is for.
"""

from __future__ import annotations

import hmac
import math
from collections import Counter

import attrs
import trio

from .._errors import NoPermError, TokenPoolError
from .._limits import RateLimiter
from .._log import get_logger
from ._base import Request

log = get_logger("tokenpool.commands")


class NoAuthError(TokenPoolError):
    """A password is set and the client has not authenticated."""

    code = "NOAUTH"


class WrongPassError(TokenPoolError):
    """The password (or user) is wrong, or the client address ran out of attempts."""

    code = "WRONGPASS"


class BusyError(TokenPoolError):
    """A rate limit refused the request; ``retry_after`` seconds until it would pass."""

    code = "BUSY"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@attrs.frozen
class CommandSettings:
    """What the command layer needs of the server's settings."""

    password: str | None = None
    admin_password: str | None = None
    auth_delay: float = 0.1
    auth_rate: float = 10.0
    auth_burst: int = 20
    rate_limit: float = 0.0  # requests a second per client address; 0: no limit
    rate_burst: int = 0  # at once per client address; 0: one second's worth
    user_rate_limit: float = 0.0  # activations a second per user id; 0: no limit
    user_rate_burst: int = 0
    default_pool: str = "default"  # the pool of the commands that name none (--name)


class Client:
    """One client as the command layer sees it: where it is, who it is."""

    __slots__ = ("authed", "bearer", "host", "peer", "transport", "user")

    def __init__(self, peer: str, transport: str, settings: CommandSettings) -> None:
        self.peer = peer
        # an HTTP client's password, kept for a request sent on to another node (VIA)
        self.bearer: str | None = None
        self.host = peer.rsplit(":", 1)[0]
        self.transport = transport
        self.reset(settings)

    def reset(self, settings: CommandSettings) -> None:
        """As a new connection starts: leasing needs a password only if one is set;
        reshaping pools needs the admin user only if an admin password is set."""
        self.authed = settings.password is None
        self.user = "default" if self.authed and settings.admin_password is None else ""


def _limiter(rate: float, burst: int) -> RateLimiter | None:
    if rate <= 0:
        return None
    return RateLimiter(rate, burst or max(1, math.ceil(rate)))


class Gate:
    """Authentication and rate limits, shared by every transport of one server."""

    def __init__(self, settings: CommandSettings) -> None:
        self.settings = settings
        self.guesses = RateLimiter(settings.auth_rate, settings.auth_burst, keys=10_000)
        self.client_limit = _limiter(settings.rate_limit, settings.rate_burst)
        self.user_limit = _limiter(settings.user_rate_limit, settings.user_rate_burst)
        self.auth_failures: Counter[str] = Counter()  # by transport
        self.rate_limited: Counter[str] = Counter()

    @property
    def passwords(self) -> bool:
        return self.settings.password is not None or self.settings.admin_password is not None

    # -- passwords ----------------------------------------------------------------

    def _matches(self, user: str | None, password: str) -> str | None:
        """The user this password opens (``user`` or, with None, either), else None.

        Both comparisons run whatever matches (constant time, no early exit)."""
        s = self.settings
        given = password.encode("utf-8", "surrogateescape")
        admin = s.admin_password is not None and hmac.compare_digest(
            given, s.admin_password.encode("utf-8", "surrogateescape")
        )
        default = s.password is not None and hmac.compare_digest(
            given, s.password.encode("utf-8", "surrogateescape")
        )
        if admin and user in (None, "admin"):
            return "admin"
        if default and user in (None, "default"):
            return "default"
        return None

    def check_password(self, client: Client, user: str | None, password: str) -> None:
        """``AUTH [user] password`` (``user`` None: a bearer, either user's password),
        without the delay: raises ``WrongPassError`` at once for a wrong one (counted
        once, the address's budget spent). The HTTP workers' ``VIA`` uses it, and the
        worker makes its client wait."""
        if not self.passwords:
            raise TokenPoolError(
                "AUTH <password> called without any password configured for the default"
                " user. Are you sure your configuration is correct?"
            )
        host = client.host
        matched = None
        if not self.guesses.blocked(host):
            matched = self._matches(user, password)
        if matched is not None:
            client.authed = True
            client.user = matched
            return
        self.guesses.take(host)
        self.auth_failures[client.transport] += 1
        log.warning(
            "auth_failed",
            transport=client.transport,
            peer=client.peer,
            user=(user or "bearer")[:64],
        )
        raise WrongPassError("invalid username-password pair or user is disabled.")

    async def authenticate(self, client: Client, user: str | None, password: str) -> None:
        """``check_password``, and a wrong one answered after ``auth_delay``."""
        try:
            self.check_password(client, user, password)
        except WrongPassError:
            await trio.sleep(self.settings.auth_delay)  # every failed attempt, not once a pipeline
            raise

    # -- each request ---------------------------------------------------------------

    def admit(self, client: Client, request: Request | None, *, counted: bool = True) -> None:
        """May ``client`` run ``request`` now? Raises ``NoAuthError``, ``NoPermError`` or
        ``BusyError``. ``counted``: it spends the client address's rate budget (False for
        the commands of a transaction, counted when queued)."""
        if not client.authed:
            raise NoAuthError("Authentication required.")
        if (
            request is not None
            and request.admin
            and self.settings.admin_password is not None
            and client.user != "admin"
        ):
            raise NoPermError(
                "this command needs the admin user (--admin-password): over RESP AUTH admin"
                " <password>, over HTTP Authorization: Bearer <admin password>"
            )
        if counted:
            self.spend(client, request)

    def spend(self, client: Client, request: Request | None) -> None:
        """Spend the rate budgets of one request (the client's; the user's for an activation)."""
        if self.client_limit is None and self.user_limit is None:
            return
        wait = 0.0
        what = ""
        if self.client_limit is not None:
            wait = self.client_limit.take(client.host)
            what = f"{self.client_limit.rate:g} requests a second from one client address"
        user = getattr(request, "user_id", None) if request is not None else None
        if (
            not wait
            and self.user_limit is not None
            and request is not None
            and request.name == "activate"
            and user
        ):
            wait = self.user_limit.take(user)
            what = f"{self.user_limit.rate:g} activations a second for one user"
        if wait:
            self.rate_limited[client.transport] += 1
            raise BusyError(f"rate limit of {what} reached; retry in {wait:.3f} s", wait)
