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

from . import __version__
from ._commands import CommandSettings
from ._errors import InvalidArgumentError, TokenPoolError
from ._metrics import Latencies
from ._pool import open_pools
from ._server import RespServer, RespSettings
from ._settings import (
    MAX_SECONDS,
    MAX_SIZE,
    MIN_TTL,
    WHEN_FULL,
    PoolSettings,
    check_choice,
    check_int,
    check_name,
    check_seconds,
    parse_int,
    parse_seconds,
)
from ._store import check_store_url, redact

if TYPE_CHECKING:
    from ._http import HttpApp

DEFAULT_STORE = "sqlite:///data/tokenpool.db"


def _int(low: int, high: int) -> Callable[[Any, str], int]:
    def check(value: Any, what: str) -> int:
        if isinstance(value, str):
            return parse_int(value.strip(), what, low, high)
        return check_int(value, what, low, high)

    return check


def _seconds(low: float, high: float, none_ok: bool = False) -> Callable[[Any, str], float | None]:
    def check(value: Any, what: str) -> float | None:
        if none_ok and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "0"))
        ):
            return None
        if isinstance(value, str):
            return parse_seconds(value.strip(), what, low, high)
        return check_seconds(value, what, low, high)

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
    if isinstance(value, str):
        rate = parse_seconds(value.strip(), what, 0.0, 1e9)
    else:
        rate = check_seconds(value, what, 0.0, 1e9)
    if 0 < rate < 0.001:
        raise InvalidArgumentError(f"{what} must be 0 (off) or from 0.001 to 1e9, not {rate:g}")
    return rate


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


OPTIONS = [
    Option("host", _host, "127.0.0.1", "address to bind (a non-loopback one needs a password)"),
    Option("port", _int(0, 65535), 7379, "RESP port (0 picks a free one)"),
    Option("http-host", _host, "127.0.0.1", "HTTP address (a non-loopback one needs a password)"),
    Option("http-port", _int(0, 65535), 4000, "HTTP port: REST API, /metrics, dashboard (0: off)"),
    Option("size", _int(1, MAX_SIZE), 100, "tokens in the pool 'default'"),
    Option("ttl", _seconds(MIN_TTL, MAX_SECONDS), 120.0, "seconds a lease lasts"),
    Option(
        "when-full", _choice(*WHEN_FULL), "evict", "evict, reject or wait when every token is held"
    ),
    Option(
        "min-hold", _seconds(0.0, MAX_SECONDS), 0.0, "evict never ends a lease younger than this"
    ),
    Option(
        "max-lifetime", _seconds(MIN_TTL, MAX_SECONDS, True), None, "renew never goes past this"
    ),
    Option("name", lambda v, w: check_name(v, w), "default", "the pool the flags above describe"),
    Option("dsn", _store, DEFAULT_STORE, "store: postgresql://..., sqlite:///file.db or 'memory'"),
    Option("durability", _choice("async", "sync"), "async", "async (answer at once) or sync"),
    Option("flush-interval", _seconds(0.0, 1.0), 0.002, "async: seconds changes gather per commit"),
    Option("write-timeout", _seconds(0.1, 300.0), 5.0, "seconds one store write may take"),
    Option("shutdown-timeout", _seconds(0.0, 3600.0), 10.0, "seconds shutdown waits for the store"),
    Option("max-backlog", _int(1, 10_000_000), 100_000, "unwritten changes before refusing"),
    Option("history-memory", _int(1, 10_000_000), 100_000, "ended leases kept in memory per pool"),
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
    Option("max-clients", _int(1, 1_000_000), 10_000, "connections served at once"),
    Option("rate-limit", _rate, 0.0, "commands/requests a second per client address (0: off)"),
    Option("rate-limit-burst", _int(0, 10**9), 0, "at once per client address (0: a second's)"),
    Option("user-rate-limit", _rate, 0.0, "activations a second per user id (0: off)"),
    Option("user-rate-limit-burst", _int(0, 10**9), 0, "at once per user id (0: a second's)"),
    Option("idle-timeout", _seconds(0.1, 86_400.0), 30.0, "seconds a started command may take"),
    Option(
        "allow-insecure-bind",
        _flag,
        False,
        "allow a non-loopback host without a password",
        flag=True,
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
                BY_DEST[key].check(in_file, where)
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
    pools: dict[str, PoolSettings] = {}
    for name, table in file_pools.items():
        check_name(name, f"pool name {name!r} in {path}")
        if not isinstance(table, dict):
            raise InvalidArgumentError(f"[pools.{name}] in {path} must be a table")
        try:
            pools[name] = PoolSettings.make(**{k.replace("-", "_"): v for k, v in table.items()})
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"[pools.{name}] in {path}: {error}") from None
    flags_given = any(
        getattr(args, o) is not None or any(e in environ for e in BY_DEST[o].envs)
        for o in ("size", "ttl", "when_full", "min_hold", "max_lifetime")
    )
    name = values["name"]
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
    return Config(values, pools, warnings)


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
    log = structlog.wrap_logger(
        logging.getLogger("tokenpool.cli"),
        processors=[structlog.stdlib.render_to_log_kwargs],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
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
    latencies = Latencies()
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
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():
                        log.warning("signal_again", signal=name, note="shutdown is under way")
                        continue
                    log.info("shutting_down", signal=name)
                    stop.set()

            outer.start_soon(watch_signals)
            http_done = trio.Event()
            if http is not None:
                await _start_http(outer, http, http_stop, http_done)
            else:
                http_done.set()
            async with open_pools(
                store,
                durability=config.durability,
                history_memory=config.history_memory,
                max_backlog=config.max_backlog,
                flush_interval=config.flush_interval,
                write_timeout=config.write_timeout,
                shutdown_timeout=config.shutdown_timeout,
                declared=config.pools,
            ) as pools:
                # Everything made so far (modules, pools, tokens) lives as long as the
                # process: out of the collector's way, full collections stay short.
                gc.freeze()
                server = RespServer(
                    pools, settings, ssl_context=ssl_context, config=shown, latencies=latencies
                )
                if http is not None:
                    http.attach(server.commands, server)
                served = trio.Event()

                async def run_server(*, task_status: trio.TaskStatus[list[int]]) -> None:
                    try:
                        await server.serve(task_status=task_status)
                    finally:
                        served.set()

                async with trio.open_nursery() as nursery:
                    try:
                        ports = await nursery.start(run_server)
                    except BaseException as raised:
                        failure = _single(raised)
                        if isinstance(failure, TokenPoolError):  # the port, named
                            raise failure from None
                        raise
                    shown["port"] = str(ports[0])
                    await stop.wait()
                    server.shutdown()
                    if http is not None:
                        http.close()
                    http_stop.set()
                    # Busy connections finish their pipeline; none may take forever.
                    with trio.move_on_after(config.idle_timeout):
                        await served.wait()
                    nursery.cancel_scope.cancel()
                with trio.move_on_after(config.idle_timeout):
                    await http_done.wait()
            outer.cancel_scope.cancel()
    if pools.lost:
        log.error("stopped", changes_not_written=pools.lost)
        return 1
    log.info("stopped")
    return 0


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
        failure = _single(raised)
        if not isinstance(failure, OSError):
            raise
        if failure.errno == errno.EADDRINUSE:
            raise InvalidArgumentError(
                f"HTTP port {s.port} on {s.host} is in use; pass --http-port (0 turns HTTP off)"
            ) from None
        raise InvalidArgumentError(
            f"cannot listen for HTTP on {s.host}:{s.port}: {failure.strerror or failure}"
        ) from None


def _single(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


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
    log = structlog.wrap_logger(
        logging.getLogger("tokenpool.cli"),
        processors=[structlog.stdlib.render_to_log_kwargs],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    try:
        return trio.run(serve, config)
    except BaseException as raised:
        failure = _single(raised)
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
