"""Where a client connects, parsed once from its URL.

``tokenpool://[[user]:password@]host[:port]`` (``redis://`` too, as every Redis client
writes it); ``tokenpools://`` or ``rediss://`` for TLS; ``unix://[[user]:password@]/path``
for a Unix socket (as redis-py writes it). The port defaults to 7379 (the
server's). A password with no user is ``AUTH <password>``; with a user
(``tokenpool://admin:pw@host``) it is ``AUTH admin pw``, the server's admin user. The
password is never shown: ``str(address)`` leaves it out.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote, urlsplit

import attrs

from .._errors import InvalidArgumentError

DEFAULT_PORT: Final = 7379
_PLAIN: Final = ("tokenpool", "redis")
_TLS: Final = ("tokenpools", "rediss")
_UNIX: Final = "unix"


def host_port(address: str) -> tuple[str, int]:
    """A node's ``<host>:<port>`` (``[v6]:port`` too) as (host, port). Raises
    ``ValueError`` when the port is not a number."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@attrs.frozen
class Address:
    """A server's address and how to greet it."""

    host: str
    port: int = DEFAULT_PORT
    tls: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    unix: str | None = None  # a Unix socket's path (host and port are then unused)

    @classmethod
    def parse(cls, url: str) -> Address:
        """The address a URL names. Raises ``InvalidArgumentError`` naming what is wrong."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise InvalidArgumentError(f"bad tokenpool URL: {error}") from None
        if parts.scheme == _UNIX:
            if not parts.path.startswith("/"):
                raise InvalidArgumentError("a unix:// URL names a socket's path: unix:///path")
            return cls(
                host="localhost",
                unix=unquote(parts.path),
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password is not None else None,
            )
        if parts.scheme not in _PLAIN + _TLS:
            raise InvalidArgumentError(
                f"a tokenpool URL starts tokenpool://, tokenpools://, redis:// or rediss://,"
                f" not {parts.scheme + '://' if parts.scheme else repr(url[:20])}"
            )
        if not parts.hostname:
            raise InvalidArgumentError("a tokenpool URL needs a host (tokenpool://host:port)")
        if parts.path not in ("", "/", "/0"):
            raise InvalidArgumentError(
                f"a tokenpool URL has no path (pools are named per call), not {parts.path!r}"
            )
        return cls(
            host=parts.hostname,
            port=DEFAULT_PORT if port is None else port,
            tls=parts.scheme in _TLS,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @classmethod
    def of_node(cls, address: str, username: str, password: str) -> Address:
        """Another node of a cluster at ``<host>:<port>``, greeted as ``username``."""
        host, port = host_port(address)
        return cls(host=host, port=port, username=username, password=password)

    def auth(self) -> tuple[str, ...] | None:
        """The ``AUTH`` command to send first, or ``None``."""
        if self.password is None:
            return None
        if self.username:
            return ("AUTH", self.username, self.password)
        return ("AUTH", self.password)

    def __str__(self) -> str:
        scheme = "tokenpools" if self.tls else "tokenpool"
        user = f"{self.username}@" if self.username else ""
        if self.unix is not None:
            return f"unix://{user}{self.unix}"
        return f"{scheme}://{user}{self.host}:{self.port}"
