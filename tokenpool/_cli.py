"""The command line: ``tokenpool serve`` (also ``python -m tokenpool serve``).

Every option comes, in this order of precedence, from the command line, from
an environment variable ``TOKENPOOL_<NAME>`` (the option's name in capitals,
dashes as underscores), from the ``[server]`` table of ``--config FILE``, or
from its default; each is checked once, here, with its allowed range, and a
bad one stops the program with one line naming it. Passwords come from the
environment or a file (``--requirepass`` on the command line is visible in
``ps``: it works, with a warning). This is the only module that configures
logging: JSON lines on stderr when it is not a terminal, readable lines when
it is.
"""

from __future__ import annotations

import argparse
import errno
import gc
import ipaddress
import logging
import os
import resource
import signal
import ssl
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import structlog
import trio

from . import __version__, _trace
from ._commands import CommandSettings
from ._errors import InvalidArgumentError, TokenPoolError, lone_error
from ._log import get_logger
from ._metrics import Latencies
from ._pauses import Pauses
from ._pool import open_pools
from ._server import RespServer, RespSettings
from ._server.server import check_port
from ._settings import (
    BURST,
    CLUSTER_RENEW,
    CLUSTER_VALIDITY,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_TOKENS,
    FLUSH_INTERVAL,
    HISTORY_MEMORY,
    HTTP_WORKERS,
    IDLE_TIMEOUT,
    LOOPBACK_NAMES,
    MAX_BACKLOG,
    MAX_CLIENTS,
    MAX_LIFETIME,
    MAX_TOKENS,
    MIN_HOLD,
    PORT,
    SHUTDOWN_TIMEOUT,
    SIZE,
    TTL,
    WHEN_FULL,
    WRITE_TIMEOUT,
    PoolSettings,
    Range,
    check_choice,
    check_max_lifetime,
    check_name,
    check_seconds,
    host_name,
    parse_seconds,
)
from ._store import check_store_url, redact

if TYPE_CHECKING:
    from ._http import HttpApp

DEFAULT_STORE = "sqlite:///data/tokenpool.db"


_NUMBER_CHECKS: set[Callable[[Any, str], Any]] = set()
"""The checks of options that are numbers: a config file gives them as TOML numbers."""


def _ranged(limits: Range, none_ok: bool = False) -> Callable[[Any, str], Any]:
    """An option checked with its setting's one range (text from the command line or
    the environment, a number from the TOML file); ``none_ok``: none, 0 or empty is None."""

    def check(value: Any, what: str) -> Any:
        if none_ok and (
            value is None
            or value == 0
            or (isinstance(value, str) and value.strip().lower() in ("", "none", "0"))
        ):
            return None
        if isinstance(value, str):
            return limits.parse(value.strip(), what)
        return limits.check(value, what)

    _NUMBER_CHECKS.add(check)
    return check


def _choice(*choices: str) -> Callable[[Any, str], str]:
    return lambda value, what: check_choice(value, what, choices)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or "\x00" in value or len(value) > 4096:
        raise InvalidArgumentError(f"{what} must be text of at most 4096 characters")
    try:  # the environment decodes bytes that are not UTF-8 as lone surrogates
        value.encode()
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            f"{what} is not UTF-8 text (clients send UTF-8: nobody could match it)"
        ) from None
    text: str = value
    return text


def _read_text(path: str, what: str) -> str:
    """A file's text, or one ``InvalidArgumentError`` naming it (missing, binary, not UTF-8)."""
    try:
        return Path(path).read_bytes().decode()
    except OSError as error:
        raise InvalidArgumentError(f"{what} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise InvalidArgumentError(
            f"{what} {path}: not UTF-8 text (byte {error.start} is 0x{byte:02x})"
        ) from None


def _secret(value: Any, what: str) -> str:
    secret = _text(value, what)
    if not secret:
        raise InvalidArgumentError(f"{what} must not be empty (leave it unset for none)")
    return secret


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
        "",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise InvalidArgumentError(f"{what} must be true or false, not {value!r}")


def _store(value: Any, what: str) -> str | None:
    value = _text(value, what)
    if value == "":  # an empty DSN would silently mean "keep nothing"
        raise InvalidArgumentError(
            f"{what} is empty: give a store URL (postgresql://..., sqlite:///file.db),"
            " or 'memory' to keep nothing"
        )
    if value in ("memory", "none"):
        return None
    try:
        return check_store_url(value)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"{what}: {error}") from None


def _rate(value: Any, what: str) -> float:
    """A rate a second: 0 (off), or from 0.001 to 1e9 (the message says a rate, not the
    seconds the number parser it borrows would name)."""
    try:
        if isinstance(value, str):
            rate = parse_seconds(value.strip(), what, 0.0, 1e9)
        else:
            rate = check_seconds(value, what, 0.0, 1e9)
    except InvalidArgumentError:
        rate = -1.0
    if rate < 0 or 0 < rate < 0.001:
        shown = repr(value)[:40]
        raise InvalidArgumentError(
            f"{what} must be 0 (off) or a number a second from 0.001 to 1e9, not {shown}"
        )
    return rate


_NUMBER_CHECKS.add(_rate)


def _hosts(value: Any, what: str) -> frozenset[str]:
    """``a,b,c`` (names or addresses, any case) or ``*`` for any Host header."""
    text = _text(value, what).strip()
    if text == "*":
        return frozenset({"*"})
    names = frozenset(host_name(n) for n in text.split(",") if n.strip())
    if not names or any(not n or " " in n for n in names):
        raise InvalidArgumentError(f"{what} must be host names separated by commas, or '*'")
    return names


def _node_id(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    return check_name(value, what)


def _advertise(value: Any, what: str) -> str | None:
    """``host:port`` clients are sent to (``[v6]:port`` for an IPv6 address)."""
    if value is None or value == "":
        return None
    text = _text(value, what)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgumentError(f"{what} must be HOST:PORT (port 1 to 65535), not {text!r}")
    return text


def _host(value: Any, what: str) -> str:
    host = _text(value, what).strip()
    if not host or " " in host:
        raise InvalidArgumentError(f"{what} must be a host name or address, not {host!r}")
    return host


@attrs.frozen
class Option:
    name: str
    check: Callable[[Any, str], Any]
    default: Any
    help: str
    env: tuple[str, ...] = ()
    flag: bool = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def envs(self) -> tuple[str, ...]:
        return self.env or (f"TOKENPOOL_{self.dest.upper()}",)

    def check_in_file(self, value: Any, where: str) -> None:
        """A config file's value has a TOML type: a number option takes a number and a
        flag a boolean, as a ``[pools.NAME]`` table does (text is the command line's
        and the environment's form; ``port = "19010"`` was taken)."""
        if self.flag and not isinstance(value, bool):
            raise InvalidArgumentError(
                f"{where} must be true or false (a TOML boolean), not {_toml_kind(value)}"
            )
        if self.check in _NUMBER_CHECKS and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise InvalidArgumentError(f"{where} must be a number, not {_toml_kind(value)}")
        self.check(value, where)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


DEFAULT_HTTP_WORKERS = min(_usable_cores(), 4)
"""HTTP in worker processes by default: in the pools' own process and thread, HTTP
parsing, its objects' collections and its attacks delay every RESP reply (issue 19's
attacks: another client's PING waited up to 157 ms in-process, under 40 ms with
workers); a worker per core this process may use, at most 4 (about 70 MB each)."""


OPTIONS = [
    Option("host", _host, "127.0.0.1", "address to bind (a non-loopback one needs a password)"),
    Option("port", _ranged(PORT), 7379, "RESP port (0 picks a free one)"),
    Option("http-host", _host, "127.0.0.1", "HTTP address (a non-loopback one needs a password)"),
    Option("http-port", _ranged(PORT), 4000, "HTTP port: REST API, /metrics, dashboard (0: off)"),
    Option(
        "http-allowed-hosts",
        _hosts,
        None,
        "Host names HTTP answers for, comma-separated ('*': any); default the loopback names"
        " and --http-host",
    ),
    Option(
        "http-workers",
        _ranged(HTTP_WORKERS),
        DEFAULT_HTTP_WORKERS,
        "HTTP worker processes (uvicorn) reaching the pools over a private socket"
        " (0: HTTP in this process; default: the cores this process may use, at most 4)",
    ),
    Option("size", _ranged(SIZE), 100, "tokens in the pool 'default'"),
    Option("ttl", _ranged(TTL), 120.0, "seconds a lease lasts"),
    Option(
        "when-full", _choice(*WHEN_FULL), "evict", "evict, reject or wait when every token is held"
    ),
    Option("min-hold", _ranged(MIN_HOLD), 0.0, "evict never ends a lease younger than this"),
    Option("max-lifetime", _ranged(MAX_LIFETIME, True), None, "renew never goes past this"),
    Option("name", lambda v, w: check_name(v, w), "default", "the pool the flags above describe"),
    Option("dsn", _store, DEFAULT_STORE, "store: postgresql://..., sqlite:///file.db or 'memory'"),
    Option("durability", _choice("async", "sync"), "async", "async (answer at once) or sync"),
    Option(
        "flush-interval",
        _ranged(FLUSH_INTERVAL),
        DEFAULT_FLUSH_INTERVAL,
        "async: seconds changes gather per commit",
    ),
    Option("write-timeout", _ranged(WRITE_TIMEOUT), 5.0, "seconds one store write may take"),
    Option(
        "shutdown-timeout", _ranged(SHUTDOWN_TIMEOUT), 10.0, "seconds shutdown waits for the store"
    ),
    Option("max-backlog", _ranged(MAX_BACKLOG), 100_000, "unwritten changes before refusing"),
    Option(
        "max-tokens",
        _ranged(MAX_TOKENS),
        DEFAULT_MAX_TOKENS,
        "tokens of every pool served together; POOL CREATE/ALTER past it are refused",
    ),
    Option(
        "history-memory", _ranged(HISTORY_MEMORY), 100_000, "ended leases kept in memory per pool"
    ),
    Option(
        "requirepass",
        _secret,
        None,
        "password clients AUTH with (prefer TOKENPOOL_PASSWORD)",
        ("TOKENPOOL_PASSWORD", "TOKENPOOL_REQUIREPASS"),
    ),
    Option("requirepass-file", _text, None, "file holding that password (first line)"),
    Option("admin-password", _secret, None, "password of the admin user (AUTH admin <pw>)"),
    Option("admin-password-file", _text, None, "file holding the admin password"),
    Option("tls-cert", _text, None, "PEM certificate: serve TLS only"),
    Option("tls-key", _text, None, "PEM private key for --tls-cert"),
    Option("max-clients", _ranged(MAX_CLIENTS), 10_000, "connections served at once"),
    Option("rate-limit", _rate, 0.0, "commands/requests a second per client address (0: off)"),
    Option("rate-limit-burst", _ranged(BURST), 0, "at once per client address (0: a second's)"),
    Option("user-rate-limit", _rate, 0.0, "activations a second per user id (0: off)"),
    Option("user-rate-limit-burst", _ranged(BURST), 0, "at once per user id (0: a second's)"),
    Option("idle-timeout", _ranged(IDLE_TIMEOUT), 30.0, "seconds a started command may take"),
    Option(
        "allow-insecure-bind",
        _flag,
        False,
        "allow a non-loopback host without a password",
        flag=True,
    ),
    Option(
        "otlp-endpoint",
        _text,
        None,
        "export traces by OTLP/HTTP to this collector (http://host:4318); needs tokenpool[otlp]",
        ("TOKENPOOL_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ),
    Option("node-id", _node_id, None, "cluster mode: this node's name (needs a PostgreSQL --dsn)"),
    Option("advertise", _advertise, None, "cluster mode: HOST:PORT clients are sent to"),
    Option(
        "cluster-validity",
        _ranged(CLUSTER_VALIDITY),
        3.0,
        "cluster mode: seconds a node's lease on its slots lasts from each renewal",
    ),
    Option(
        "cluster-renew",
        _ranged(CLUSTER_RENEW),
        1.0,
        "cluster mode: seconds between renewals (at most a third of the validity)",
    ),
    Option("log-level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("log-format", _choice("auto", "json", "console"), "auto", "log line format"),
]
BY_DEST = {o.dest: o for o in OPTIONS}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tokenpool: {message} (see tokenpool serve --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenpool", description="Finite pools of leased tokens.")
    parser.add_argument("--version", action="version", version=f"tokenpool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser(
        "serve",
        help="serve pools over RESP (redis-cli and any Redis client work)",
        description="Serve pools over RESP. Each option also reads TOKENPOOL_<OPTION>;"
        " --config FILE reads pools and options from TOML.",
    )
    serve.add_argument("--config", default=None, help="TOML file: [server] options, [pools.<name>]")
    for option in OPTIONS:
        if option.flag:
            serve.add_argument(
                f"--{option.name}", action="store_const", const=True, default=None, help=option.help
            )
        else:
            default = "none" if option.default is None else option.default
            serve.add_argument(
                f"--{option.name}",
                default=None,
                metavar=option.dest.upper(),
                help=f"{option.help} (default {default}; env {option.envs[0]})",
            )
    return parser


@attrs.frozen
class Config:
    """Every setting of ``tokenpool serve``, checked."""

    values: dict[str, Any]
    pools: dict[str, PoolSettings]
    warnings: list[str]
    # Whether any setting of the ``--name`` pool was given (flags, environment, the
    # file). If none was, its settings are only the defaults for creating it: a store
    # that holds the pool keeps the settings it has (a POOL ALTER survives a restart).
    default_given: bool = True

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def load_config(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    """Merge the command line, the environment and the config file; check every value.

    Raises ``InvalidArgumentError`` naming the setting, where it came from and the range.
    """
    file: dict[str, Any] = {}
    file_pools: dict[str, Any] = {}
    path = args.config or environ.get("TOKENPOOL_CONFIG")
    if path:
        path = _text(path, "--config")
        try:
            data = tomllib.loads(_read_text(path, "--config"))
        except tomllib.TOMLDecodeError as error:
            raise InvalidArgumentError(f"--config {path}: not valid TOML: {error}") from None
        unknown = set(data) - {"server", "pools"}
        if unknown:
            raise InvalidArgumentError(
                f"--config {path}: unknown table(s) {', '.join(sorted(unknown))}"
            )
        for table, shape in (("server", "[server] option = value"), ("pools", "[pools.NAME]")):
            if not isinstance(data.get(table, {}), dict):
                raise InvalidArgumentError(
                    f"--config {path}: {table!r} must be a table ({shape}),"
                    f" not {_toml_kind(data[table])}"
                )
        file = {k.replace("-", "_"): v for k, v in data.get("server", {}).items()}
        file_pools = dict(data.get("pools", {}))
        for key, in_file in file.items():
            if key not in BY_DEST:
                raise InvalidArgumentError(f"--config {path}: unknown [server] option {key!r}")
            where = f"{key} in {path}"
            try:  # every value in the file is checked, even one the command line overrides
                BY_DEST[key].check_in_file(in_file, where)
            except InvalidArgumentError as error:
                if where in str(error):
                    raise
                raise InvalidArgumentError(f"{where}: {error}") from None
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for option in OPTIONS:
        given = getattr(args, option.dest)
        source = f"--{option.name}"
        raw: Any = given
        if raw is None:
            for env in option.envs:
                if env in environ:
                    raw, source = environ[env], env
                    break
        if raw is None and option.dest in file:
            raw, source = file[option.dest], f"{option.dest} in {path}"
        if raw is None:
            values[option.dest] = option.default
            continue
        try:
            values[option.dest] = option.check(raw, source)
        except InvalidArgumentError as error:
            if source in str(error):
                raise
            raise InvalidArgumentError(f"{source}: {error}") from None
        if option.name in ("requirepass", "admin-password") and given is not None:
            warnings.append(
                f"--{option.name} on the command line is visible to every user of this machine"
                f" (ps); pass it in {option.envs[0]} or --{option.name}-file instead"
            )
    for name in ("requirepass", "admin_password"):
        file_option = values.get(f"{name}_file")
        if file_option:
            if values.get(name):
                raise InvalidArgumentError(
                    f"give --{name.replace('_', '-')} or its -file, not both"
                )
            text = _read_text(file_option, f"--{name.replace('_', '-')}-file").splitlines()
            values[name] = _secret(
                text[0] if text else "", f"--{name.replace('_', '-')}-file {file_option}"
            )
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise InvalidArgumentError("--tls-cert and --tls-key go together")
    if values["node_id"] is not None:
        if not str(values["dsn"] or "").startswith(("postgresql://", "postgres://")):
            raise InvalidArgumentError(
                "cluster mode (--node-id) needs a PostgreSQL --dsn: every node of a cluster"
                " uses the same database and schema"
            )
        if values["cluster_renew"] * 3 > values["cluster_validity"]:
            raise InvalidArgumentError(
                f"--cluster-renew {values['cluster_renew']:g} must be at most a third of"
                f" --cluster-validity {values['cluster_validity']:g}"
            )
    else:  # a cluster setting without cluster mode would be ignored without a word
        cluster = [
            d for d in ("cluster_validity", "cluster_renew") if _given(args, environ, file, d)
        ]
        if values["advertise"] is not None:
            cluster.insert(0, "advertise")
        if cluster:
            flag = cluster[0].replace("_", "-")
            raise InvalidArgumentError(f"--{flag} needs --node-id (cluster mode)")
    pools: dict[str, PoolSettings] = {}
    for name, table in file_pools.items():
        check_name(name, f"pool name {name!r} in {path}")
        if not isinstance(table, dict):
            raise InvalidArgumentError(f"[pools.{name}] in {path} must be a table")
        try:
            given = {k.replace("-", "_"): v for k, v in table.items()}
            if "max_lifetime" in given:  # 0 for none, as the flag (TOML has no null)
                given["max_lifetime"] = check_max_lifetime(given["max_lifetime"])
            pools[name] = PoolSettings.make(**given)
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"[pools.{name}] in {path}: {error}") from None
    flags_given = any(
        getattr(args, o) is not None or any(e in environ for e in BY_DEST[o].envs)
        for o in ("size", "ttl", "when_full", "min_hold", "max_lifetime")
    )
    name = values["name"]
    default_given = name in pools or flags_given
    if name not in pools or flags_given:
        base = pools.get(name, PoolSettings())
        changes = {
            "size": values["size"] if _given(args, environ, file, "size") else base.size,
            "ttl": values["ttl"] if _given(args, environ, file, "ttl") else base.ttl,
            "when_full": values["when_full"]
            if _given(args, environ, file, "when_full")
            else base.when_full,
            "min_hold": values["min_hold"]
            if _given(args, environ, file, "min_hold")
            else base.min_hold,
            "max_lifetime": values["max_lifetime"]
            if _given(args, environ, file, "max_lifetime")
            else base.max_lifetime,
        }
        pools[name] = PoolSettings.make(**changes)
        pools = {name: pools[name], **{k: v for k, v in pools.items() if k != name}}
    return Config(values, pools, warnings, default_given)


def _toml_kind(value: object) -> str:
    """What a TOML value is, in TOML's words (for a message)."""
    if isinstance(value, list):
        return (
            "an array of tables ([[...]])" if value and isinstance(value[0], dict) else "an array"
        )
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def _given(
    args: argparse.Namespace, environ: dict[str, str], file: dict[str, Any], dest: str
) -> bool:
    option = BY_DEST[dest]
    return getattr(args, dest) is not None or any(e in environ for e in option.envs) or dest in file


def configure_logging(level: str, fmt: str) -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger("tokenpool")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)] + [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False
    # The HTTP servers' own lines (uvicorn's "Exception in ASGI application" with its
    # traceback, in a worker) go through the same handler: JSON too, never Python's
    # plain-text last resort.
    for name in ("uvicorn", "hypercorn"):
        server = logging.getLogger(name)
        server.handlers = [handler]
        server.propagate = False


def _allowed_hosts(config: Config) -> frozenset[str] | None:
    """The Host names HTTP answers for: as given, else the loopback names and --http-host
    (unless it is a wildcard address: then only the loopback names, say the others)."""
    given: frozenset[str] | None = config.values.get("http_allowed_hosts")
    if given is not None:
        return None if "*" in given else given
    names = set(LOOPBACK_NAMES)
    if config.http_host not in ("0.0.0.0", "::", ""):
        names.add(host_name(config.http_host))
    return frozenset(names)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


RESERVED_FDS = 64
"""File descriptors kept for what is not a client: listeners, the store (SQLite's
database, log and shared-memory files, the reader, the store process's pipes), logs
(Redis keeps 32; we have more)."""


def fd_budget(max_clients: int, http: bool, soft: int, hard: int) -> tuple[int, int, str | None]:
    """The soft ``RLIMIT_NOFILE`` to ask for, the clients that fit it, and a warning.

    As Redis: ask for enough descriptors for ``max_clients`` (RESP), as many HTTP
    event streams (at most 10,000) and ``RESERVED_FDS``; when the hard limit is lower,
    lower ``max_clients`` to what fits, with a warning. Raises ``InvalidArgumentError``
    when not even one client fits."""
    streams = min(max_clients, 10_000) if http else 0
    need = max_clients + streams + RESERVED_FDS
    limit = need if hard == resource.RLIM_INFINITY else min(need, hard)
    limit = max(limit, soft)
    if need <= limit:
        return limit, max_clients, None
    room = limit - RESERVED_FDS
    fits = room // 2 if http else room
    if http and room - fits > 10_000:
        fits = room - 10_000
    if fits < 1:
        raise InvalidArgumentError(
            f"the open-file limit is {limit} (ulimit -n): too low to serve any client;"
            f" {RESERVED_FDS + 2} at least"
        )
    return (
        limit,
        fits,
        f"--max-clients {max_clients} needs {need} open files but the hard limit is {hard}"
        f" (ulimit -Hn): serving at most {fits} clients",
    )


def _raise_fd_limit(max_clients: int, http: bool, log: Any) -> int:
    """Raise the soft open-file limit towards the hard one; the clients that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit, fits, warning = fd_budget(max_clients, http, soft, hard)
    if limit > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (OSError, ValueError) as error:
            limit, fits, warning = fd_budget(max_clients, http, soft, soft)
            log.warning("open_file_limit_not_raised", limit=soft, error=str(error))
    if warning is not None:
        log.warning("max_clients_lowered", max_clients=fits, open_files=limit, note=warning)
    return fits


async def serve(config: Config) -> int:
    log = get_logger("tokenpool.cli")
    for warning in config.warnings:
        log.warning("insecure_setting", note=warning)
    ssl_context = None
    if config.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as error:
            raise InvalidArgumentError(f"--tls-cert/--tls-key: {error}") from None
    for option, host in (("--host", config.host), ("--http-host", config.http_host)):
        if option == "--http-host" and not config.http_port:
            continue
        if not _is_loopback(host) and not config.requirepass and not config.allow_insecure_bind:
            raise InvalidArgumentError(
                f"refusing to listen on {host} ({option}) without --requirepass;"
                " set a password (TOKENPOOL_PASSWORD) or pass --allow-insecure-bind"
            )
    if config.otlp_endpoint:
        _trace.configure(config.otlp_endpoint)  # InvalidArgumentError without the extra
        log.info("tracing", otlp_endpoint=config.otlp_endpoint)
    store = config.dsn
    max_clients = _raise_fd_limit(config.max_clients, bool(config.http_port), log)
    settings = RespSettings(
        host=config.host,
        port=config.port,
        max_clients=max_clients,
        idle_timeout=config.idle_timeout,
        commands=CommandSettings(
            password=config.requirepass,
            admin_password=config.admin_password,
            rate_limit=config.rate_limit,
            rate_burst=config.rate_limit_burst,
            user_rate_limit=config.user_rate_limit,
            user_rate_burst=config.user_rate_limit_burst,
            default_pool=config.name,
        ),
    )
    pauses = Pauses()
    latencies = Latencies(pauses)
    http = None
    if config.http_port:
        # Imported only when served: FastAPI, pydantic and starlette are most of the
        # process's modules, and --http-port 0 should not carry them.
        from ._http import HttpApp, HttpSettings

        http = HttpApp(
            HttpSettings(
                host=config.http_host,
                port=config.http_port,
                max_streams=min(max_clients, 10_000),
                certfile=config.tls_cert,
                keyfile=config.tls_key,
                allowed_hosts=_allowed_hosts(config),
                idle_timeout=config.idle_timeout,
            ),
            latencies,
        )
    http_stop = trio.Event()
    default = config.pools[config.name]
    shown: dict[str, str] = {
        "size": str(default.size),
        "ttl": f"{default.ttl:g}",
        "name": config.name,
        "when-full": default.when_full,
        "durability": config.durability,
        "flush-interval": f"{config.flush_interval:g}",
        "store": redact(store) if store else "memory",
        "maxclients": str(max_clients),
        "timeout": f"{config.idle_timeout:g}",
        "port": str(config.port),
        "bind": config.host,
        "tls": "yes" if ssl_context else "no",
        # redis-benchmark reads these two at start; the Redis persistence they
        # describe does not apply (the store is set by --dsn).
        "save": "",
        "appendonly": "no",
    }
    stop = trio.Event()
    hurry = trio.Event()  # a second signal: shutdown to its minimum
    served_pools: list[Any] = []  # the pools, once open: a second signal hurries them
    # Clients get this long to finish what they started (a blocked write is dropped
    # after it anyway); the store gets shutdown_timeout after that.
    grace = min(config.idle_timeout, config.shutdown_timeout)
    with (
        pauses.watching_gc(),
        # SIGHUP too: the terminal of a server started by hand was closed; a stop like
        # the others (its default action killed the server as a crash would)
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
    ):
        async with trio.open_nursery() as outer:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():
                        log.warning(
                            "signal_again",
                            signal=name,
                            note="shutdown shortened: clients are dropped, the store gets"
                            f" at most {HURRY_SECONDS:g} s more",
                        )
                        hurry.set()
                        for opened in served_pools:
                            opened.hurry(HURRY_SECONDS)
                        continue
                    log.info("shutting_down", signal=name)
                    stop.set()

            outer.start_soon(watch_signals)
            outer.start_soon(pauses.heartbeat)
            await check_port(config.host, config.port)  # before the pools are taken over
            http_done = trio.Event()
            workers = None
            if http is not None and config.http_workers:
                workers = await _start_http_workers(
                    outer, http, config, grace, http_stop, http_done, stop
                )
            elif http is not None:
                await _start_http(outer, http, http_stop, http_done)
            else:
                http_done.set()
            clustered = config.node_id is not None
            async with open_pools(
                store,
                durability=config.durability,
                history_memory=config.history_memory,
                max_backlog=config.max_backlog,
                flush_interval=config.flush_interval,
                write_timeout=config.write_timeout,
                shutdown_timeout=config.shutdown_timeout,
                # cluster mode: a node serves the pools of the slots it takes, later
                declared=None if clustered else _declared(config),
                restore=not clustered,
                max_tokens=config.max_tokens,
            ) as pools:
                served_pools.append(pools)
                if not clustered and config.name not in pools:  # new, with the defaults
                    await pools.create(config.name, config.pools[config.name])
                if config.name in pools:  # CONFIG GET: what it has (the store's, if kept)
                    live = pools.get(config.name).settings
                    shown.update(size=str(live.size), ttl=f"{live.ttl:g}")
                    shown["when-full"] = live.when_full
                if hurry.is_set():
                    pools.hurry(HURRY_SECONDS)
                # Everything made so far (modules, pools, tokens) lives as long as the
                # process: out of the collector's way, full collections stay short.
                gc.freeze()
                # A young collection runs when tracked objects made outnumber those freed
                # by the threshold. Python's 700 is crossed all the time by the requests
                # in flight (each a few objects; 50 clients at pipeline 16 hold 800
                # requests, 500 clients 8,000). 600,000 activations, 500 clients: 4,081
                # collections took 3.3 s at 700; 27 took 0.16 s at 10,000 (50 clients:
                # 19 of 40 ms in all, none over 5 ms).
                gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
                pools.observe_batches(pauses.actor_batch)
                node = _cluster_node(config, pools) if clustered else None
                peers = None if node is None else _peers(node)
                server = RespServer(
                    pools,
                    settings,
                    ssl_context=ssl_context,
                    config=shown,
                    latencies=latencies,
                    cluster=node,
                )
                server.planner.peers = peers  # before the HTTP tier: it reaches them
                if http is not None:
                    http.attach(server.commands, server)
                served = trio.Event()
                link = None if workers is None else workers.link_server(server, settings)

                async def run_server(*, task_status: trio.TaskStatus[list[int]]) -> None:
                    try:
                        await server.serve(task_status=task_status)
                    finally:
                        served.set()

                async with trio.open_nursery() as nursery:
                    if link is not None:  # before the port: workers reach the pools at once
                        await nursery.start(link.serve)
                    try:
                        ports = await nursery.start(run_server)
                    except BaseException as raised:
                        failure = lone_error(raised)
                        if isinstance(failure, TokenPoolError):  # the port, named
                            raise failure from None
                        raise
                    shown["port"] = str(ports[0])
                    if http is not None:
                        nursery.start_soon(http.sample)  # the series of /api/.../series
                    if node is not None:
                        node.advertise(config.host, ports[0])
                        assert peers is not None
                        await nursery.start(peers.run)
                        await nursery.start(node.run)
                    await stop.wait()
                    if node is not None:
                        # Its slots go to the other nodes now, their pools written first.
                        with trio.move_on_after(config.shutdown_timeout):
                            await node.leave()
                    server.shutdown()
                    if http is not None:
                        http.close()
                    http_stop.set()
                    # Waiting activations are answered now: no client holds shutdown.
                    await pools.stop_waiting()
                    # Busy connections finish their pipeline; none may take longer than
                    # the grace, and a second signal ends it at once.
                    await _wait_bounded(served, hurry, grace)
                    if link is not None:  # the workers finish their requests through it
                        await _wait_bounded(http_done, hurry, grace + 1)
                        link.shutdown()
                    nursery.cancel_scope.cancel()
                await _wait_bounded(http_done, hurry, grace)
            # The store is closed and what it lost counted: the exit status is known.
            # The exit status tells the truth: 0 only if everything acknowledged was written.
            code = 1 if pools.lost or pools.store_died else 0
            if code:
                log.error(
                    "stopped",
                    changes_not_written=pools.lost,
                    store_process_died=pools.store_died,
                )
            else:
                log.info("stopped")
            if not http_done.is_set():
                # hypercorn shields its socket writes: a client that stops reading would
                # hold the process forever. Nothing is left to write: exit regardless.
                trio.lowlevel.spawn_system_task(_exit_after, log, HURRY_SECONDS, code)
            outer.cancel_scope.cancel()
    if _trace.on:
        _trace.disable()  # exports what is left
    return code


def _cluster_node(config: Config, pools: Any) -> Any:
    from ._cluster.directory import Directory
    from ._cluster.node import ClusterNode, ClusterSettings

    return ClusterNode(
        pools,
        ClusterSettings(
            node_id=config.node_id,
            address=config.advertise or "",
            validity=config.cluster_validity,
            renew=config.cluster_renew,
        ),
        Directory(config.dsn, timeout=config.cluster_validity),
        declared=config.pools,
    )


def _declared(config: Config) -> dict[str, PoolSettings]:
    """The pools served with the settings the configuration gives them (changed in the
    store if they differ): the ``--name`` pool only if a setting of it was given."""
    return {
        name: settings
        for name, settings in config.pools.items()
        if name != config.name or config.default_given
    }


def _peers(node: Any) -> Any:
    from ._cluster.peers import Peers

    return Peers(node)


async def _exit_after(log: Any, seconds: float, code: int) -> None:
    """Exit with ``code`` in ``seconds`` if the HTTP server has not ended by then."""
    await trio.sleep(seconds)
    log.warning("http_clients_abandoned", note="a client stopped reading; exiting without it")
    logging.shutdown()
    os._exit(code)


HURRY_SECONDS = 1.0
"""After a second SIGTERM/SIGINT, the most the store process is given to write what it
holds (what is left is counted as not written, and the exit status says so)."""
YOUNG_COLLECTION_THRESHOLD = 10_000
"""The server's threshold of young collections (Python's default: 700): see ``serve``."""


async def _wait_bounded(event: trio.Event, hurry: trio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``, and not at all once ``hurry`` is set."""
    with trio.move_on_after(seconds) as scope:
        async with trio.open_nursery() as nursery:

            async def on_hurry() -> None:
                await hurry.wait()
                scope.cancel()

            nursery.start_soon(on_hurry)
            await event.wait()
            nursery.cancel_scope.cancel()


async def _start_http(
    nursery: trio.Nursery, app: HttpApp, stop: trio.Event, done: trio.Event
) -> None:
    """Serve HTTP from now on (``/readyz`` says 503 until the pools are recovered)."""
    s = app.settings

    async def run(*, task_status: trio.TaskStatus[int]) -> None:
        try:
            from ._http import serve_http

            await serve_http(app, shutdown=stop, task_status=task_status)
        finally:
            done.set()

    try:
        await nursery.start(run)
    except BaseException as raised:
        failure = lone_error(raised)
        if not isinstance(failure, OSError):
            raise
        if failure.errno == errno.EADDRINUSE:
            raise InvalidArgumentError(
                f"HTTP port {s.port} on {s.host} is in use; pass --http-port (0 turns HTTP off)"
            ) from None
        raise InvalidArgumentError(
            f"cannot listen for HTTP on {s.host}:{s.port}: {failure.strerror or failure}"
        ) from None


async def _start_http_workers(
    nursery: trio.Nursery,
    app: HttpApp,
    config: Config,
    grace: float,
    stop: trio.Event,
    done: trio.Event,
    signalled: trio.Event,
) -> Any:
    """Bind the HTTP port and start ``--http-workers`` processes on it (they answer 503
    until the pools are recovered and the link to them is served). Waits for them to
    accept (``supervise_workers``), at most 30 s, and not once a stop signal came."""
    from ._http.supervisor import HttpWorkers

    s = app.settings
    try:
        workers = HttpWorkers(
            app,
            config.http_workers,
            grace=grace,
            default_pool=config.name,
            max_clients=config.max_clients,
            log_level=config.log_level,
            log_format=config.log_format,
            otlp_endpoint=config.otlp_endpoint,
        )
    except OSError as failure:
        if failure.errno == errno.EADDRINUSE:
            raise InvalidArgumentError(
                f"HTTP port {s.port} on {s.host} is in use; pass --http-port (0 turns HTTP off)"
            ) from None
        raise InvalidArgumentError(
            f"cannot listen for HTTP on {s.host}:{s.port}: {failure.strerror or failure}"
        ) from None

    async def run() -> None:
        try:
            await workers.run(stop)
        finally:
            done.set()

    nursery.start_soon(run)
    # as in-process HTTP: serving before the pools recover
    await _wait_bounded(workers.ready, signalled, 30)
    return workers


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    try:
        config = load_config(args, env)
    except InvalidArgumentError as error:
        print(f"tokenpool: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    log = get_logger("tokenpool.cli")
    try:
        return trio.run(serve, config)
    except BaseException as raised:
        failure = lone_error(raised)
        if isinstance(failure, InvalidArgumentError):
            log.error("cannot_start", code=failure.code, error=str(failure))
            return 2
        if isinstance(failure, TokenPoolError):
            log.error("cannot_start", code=failure.code, error=str(failure))
            return 1
        if isinstance(failure, OSError):
            log.error("cannot_start", error=f"{failure.strerror or failure}")
            return 1
        if isinstance(failure, KeyboardInterrupt):
            return 130
        raise
