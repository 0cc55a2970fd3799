"""Every setting's allowed range, checked once where the value enters.

The CLI, the environment, the TOML file, ``POOL CREATE``/``ALTER``, the HTTP
API and ``open_pool()`` all go through these functions, so a value is refused
with the same one-line message (the setting, the value, the allowed range)
wherever it comes from, and nothing past the edge ever sees a bad one.

Numbers written as text are ASCII only: ``str.isdigit()`` and ``int()``
accept ``²`` and ``٣``, and ``int()`` refuses more than 4,300 digits with a
``ValueError`` of its own, so text is matched against an ASCII pattern of
bounded length before any conversion.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, Final

import attrs

from ._errors import InvalidArgumentError

MAX_SIZE: Final = 10_000_000
"""The most tokens one pool may have (about a gigabyte of memory at this size)."""
MAX_SECONDS: Final = 10 * 365.25 * 86400
"""The longest ttl, min-hold, max-lifetime or wait: ten years."""
MIN_TTL: Final = 0.001


class WhenFull(enum.StrEnum):
    """What a full pool does with an activation."""

    EVICT = "evict"
    REJECT = "reject"
    WAIT = "wait"


WHEN_FULL: Final = tuple(w.value for w in WhenFull)

_INT = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_FLOAT = re.compile(
    r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?", re.ASCII
)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_int(text: str, what: str, low: int, high: int) -> int:
    """``text`` as an integer from ``low`` to ``high``; else ``InvalidArgumentError``."""
    if not isinstance(text, str) or not _INT.fullmatch(text):
        raise InvalidArgumentError(
            f"{what} must be an integer from {low:,} to {high:,}, not {_shown(text)}"
        )
    return check_int(int(text), what, low, high)


def check_int(value: object, what: str, low: int, high: int) -> int:
    """``value`` if it is an ``int`` (not a bool) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(
            f"{what} must be an integer from {low:,} to {high:,}, not {_shown(value)}"
        )
    return value


def parse_seconds(text: str, what: str, low: float, high: float) -> float:
    """``text`` as a finite number of seconds from ``low`` to ``high``."""
    if not isinstance(text, str) or not _FLOAT.fullmatch(text):
        raise InvalidArgumentError(
            f"{what} must be a number of seconds from {_plain(low)} to {_plain(high)},"
            f" not {_shown(text)}"
        )
    return check_seconds(float(text), what, low, high)


def check_seconds(value: object, what: str, low: float, high: float) -> float:
    """``value`` as a float if it is a finite real number from ``low`` to ``high``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))  # (an int is finite)
        or not low <= value <= high
    ):
        raise InvalidArgumentError(
            f"{what} must be a number of seconds from {_plain(low)} to {_plain(high)},"
            f" not {_shown(value)}"
        )
    return float(value)


def _plain(number: float) -> str:
    """A bound as people read it: ``0.001``, ``315,576,000`` (not ``3.15576e+08``)."""
    return f"{number:,.3f}".rstrip("0").rstrip(".")


def check_name(value: object, what: str = "pool name") -> str:
    """A pool name: 1 to 64 characters of ``[A-Za-z0-9_.-]``, and not ``.`` or ``..``
    (a URL path segment: ``/api/pools/../tokens`` is ``/api/tokens`` to every browser)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise InvalidArgumentError(
            f"{what} must be 1 to 64 characters of A-Z a-z 0-9 _ . - (not . or ..),"
            f" not {_shown(value)}"
        )
    return value


def check_choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise InvalidArgumentError(
            f"{what} must be one of {', '.join(choices)}; not {_shown(value)}"
        )
    return value.lower()


@attrs.frozen
class Range:
    """One setting's or argument's allowed range, written once: the command layer, the
    RESP arguments, the HTTP schema and the CLI options all check with it (and the
    HTTP schema's bounds are read from it), so they cannot disagree."""

    what: str
    low: float
    high: float
    seconds: bool = False  # a finite number of seconds, else an integer

    def check(self, value: object, what: str | None = None) -> Any:
        if self.seconds:
            return check_seconds(value, what or self.what, self.low, self.high)
        return check_int(value, what or self.what, int(self.low), int(self.high))

    def parse(self, text: str, what: str | None = None) -> Any:
        """``text`` (a RESP argument, a query string, an environment variable)."""
        if self.seconds:
            return parse_seconds(text, what or self.what, self.low, self.high)
        return parse_int(text, what or self.what, int(self.low), int(self.high))


SIZE: Final = Range("size", 1, MAX_SIZE)
TTL: Final = Range("ttl", MIN_TTL, MAX_SECONDS, seconds=True)
MIN_HOLD: Final = Range("min-hold", 0.0, MAX_SECONDS, seconds=True)
MAX_LIFETIME: Final = Range("max-lifetime", MIN_TTL, MAX_SECONDS, seconds=True)
"""A cap, or none: ``None`` in the library and JSON, ``0`` on RESP and the command line."""
WAIT: Final = Range("wait", 0.0, MAX_SECONDS, seconds=True)
HISTORY_LIMIT: Final = Range("limit", 1, 10_000)
"""History entries one page returns."""
PAGE_COUNT: Final = Range("count", 1, 1_000)
"""Tokens one page of ``tokens_page`` (``TOKENS CURSOR``, ``SCAN``) returns."""
HTTP_WORKERS: Final = Range("http-workers", 0, 64)
"""HTTP worker processes (0: HTTP is served in the server's own process)."""
NODE_USER: Final = "tokenpool-node"
"""The user a cluster node authenticates as on another node's RESP port (with the
cluster's secret, kept in its tables) to send ``VIA``."""
WORKER_USER: Final = "tokenpool-worker"
"""The user HTTP workers authenticate as on the server's private socket (with the run's
secret): the server and the workers both read it here."""
TOKENS_MAX: Final = 10_000
"""The most tokens one unpaged listing (``tokens()``, ``TOKENS``) returns."""
CLUSTER_VALIDITY: Final = Range("cluster-validity", 1.0, 600.0, seconds=True)
"""Seconds a node's lease on its hash slots lasts from each renewal (cluster mode)."""
CLUSTER_RENEW: Final = Range("cluster-renew", 0.1, 200.0, seconds=True)
"""Seconds between a node's renewals: at most a third of the validity, so two renewals
in a row may fail before the lease runs out."""


def check_listing(size: int) -> int:
    """A pool's size if one unpaged listing may hold it; else say how to page."""
    if size > TOKENS_MAX:
        raise InvalidArgumentError(
            f"the pool has {size:,} tokens; one listing holds at most {TOKENS_MAX:,}: page"
            " with TOKENS CURSOR 0 [COUNT n] or SCAN over RESP, ?cursor=0 over HTTP, and"
            " tokens_page(cursor) in the library"
        )
    return size


CURSOR: Final = Range("cursor", 0, 2**32)
BEFORE: Final = Range("before", 1, 2**63 - 1)
REVISION: Final = Range("revision", 0, 2**63 - 1)
HISTORY_MEMORY: Final = Range("history_memory", 1, 10_000_000)
QUEUE_SIZE: Final = Range("queue_size", 1, 1_000_000)
MAX_BACKLOG: Final = Range("max_backlog", 1, 10_000_000)
MAX_TOKENS: Final = Range("max_tokens", 1, 10**9)
DEFAULT_MAX_TOKENS: Final = 20_000_000
"""The server's default bound on the tokens of every pool it serves together (about
1.1 GB at 57 bytes a token): one pool of the largest size and room beside it. Without
it any client could create pools until memory ran out (an outside probe: +217 MB per
5,000,000 tokens, with no bound on how many pools)."""
FLUSH_INTERVAL: Final = Range("flush_interval", 0.0, 1.0, seconds=True)
DEFAULT_FLUSH_INTERVAL: Final = 0.01
"""An async store's changes gather this long before they go to the store process: one
transaction per 10 ms instead of one per actor turn cut PostgreSQL's CPU at 5,000
activations/s from 59% of a core to 19%, and the store process's from 19% to 7%."""
WRITE_TIMEOUT: Final = Range("write_timeout", 0.1, 300.0, seconds=True)
SHUTDOWN_TIMEOUT: Final = Range("shutdown_timeout", 0.0, 3600.0, seconds=True)
LOCK_WAIT: Final = Range("lock_wait", 0.0, 3600.0, seconds=True)
PORT: Final = Range("port", 0, 65535)
MAX_CLIENTS: Final = Range("max-clients", 1, 1_000_000)
IDLE_TIMEOUT: Final = Range("idle-timeout", 0.1, 86_400.0, seconds=True)
BURST: Final = Range("burst", 0, 10**9)


def check_max_lifetime(value: object, what: str = "max-lifetime") -> float | None:
    """``max_lifetime``: ``None`` (or 0, as RESP and the command line write it) for no cap."""
    if value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and value == 0
    ):
        return None
    return float(MAX_LIFETIME.check(value, what))


def _size(_: object, __: object, value: int) -> None:
    SIZE.check(value)


def _ttl(value: object) -> float:
    return float(TTL.check(value))


def _when_full(value: object) -> str:
    return check_choice(value, "when-full", WHEN_FULL)


def _min_hold(value: object) -> float:
    return float(MIN_HOLD.check(value))


def _max_lifetime(_: object, __: object, value: float | None) -> None:
    if value is not None:
        MAX_LIFETIME.check(value)


@attrs.frozen
class PoolSettings:
    """What a pool is: its size and its rules. Every field is checked on construction.

    - ``size``: tokens, 1 to 10,000,000.
    - ``ttl``: seconds a lease lasts, from 0.001 to ten years.
    - ``when_full``: ``evict`` (the oldest lease ends ``evicted``), ``reject``
      (``FullError``) or ``wait`` (callers that ask may wait for a token).
    - ``min_hold``: ``evict`` never ends a lease younger than this; with none old
      enough the activation is refused as under ``reject``.
    - ``max_lifetime``: ``renew`` (and the grant) never set ``expires_at`` past
      ``activated_at + max_lifetime``; ``None`` for no cap.
    """

    # Checked before any conversion: float("5") or float(True) would pass a string or a
    # bool that every other way in refuses, and "EVICT" kept as given matched no policy.
    size: int = attrs.field(default=100, validator=_size)
    ttl: float = attrs.field(default=120.0, converter=_ttl)
    when_full: str = attrs.field(default="evict", converter=_when_full)
    min_hold: float = attrs.field(default=0.0, converter=_min_hold)
    max_lifetime: float | None = attrs.field(default=None, validator=_max_lifetime)

    @classmethod
    def make(cls, **values: object) -> PoolSettings:
        """Build from loosely typed values (TOML, JSON), each checked with its own message."""
        size = SIZE.check(values.get("size", 100))
        ttl = TTL.check(values.get("ttl", 120.0))
        when_full = check_choice(values.get("when_full", "evict"), "when-full", WHEN_FULL)
        min_hold = MIN_HOLD.check(values.get("min_hold", 0.0))
        raw = values.get("max_lifetime")
        max_lifetime = None if raw is None else MAX_LIFETIME.check(raw)
        unknown = set(values) - set(SETTING_NAMES)
        if unknown:
            raise InvalidArgumentError(f"unknown pool setting(s): {', '.join(sorted(unknown))}")
        return cls(size, ttl, when_full, min_hold, max_lifetime)

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


SETTING_NAMES: Final = tuple(f.name for f in attrs.fields(PoolSettings))


LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
"""The Host names the HTTP API answers for by default (with --http-host)."""


def host_name(value: str) -> str:
    """The name in a ``Host`` header or an origin's authority, without its port."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:4000
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value
