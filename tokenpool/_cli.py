"""The command line: ``tokenpool serve`` (also ``python -m tokenpool serve``).

Every option can also come from an environment variable ``TOKENPOOL_<NAME>``
(the option's name in capitals, dashes as underscores); the command line wins.
This is the only module that configures logging: JSON lines on stderr when it
is not a terminal, readable key=value lines when it is.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

import structlog
import trio

from . import __version__
from ._errors import TokenPoolError
from ._pool import open_pool
from ._server import RespServer, Settings

DEFAULT_STORE = "sqlite:///data/tokenpool.db"


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"TOKENPOOL_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenpool", description="A pool of leased tokens.")
    parser.add_argument("--version", action="version", version=f"tokenpool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a pool over RESP (redis-cli and any Redis client work)",
        description="Serve a pool over RESP. Each option also reads TOKENPOOL_<OPTION>.",
    )
    serve.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", "7379") or 7379),
        help="TCP port (default 7379; 0 picks one)",
    )
    serve.add_argument(
        "--size",
        type=int,
        default=int(_env("SIZE", "100") or 100),
        help="tokens in the pool (default 100)",
    )
    serve.add_argument(
        "--ttl",
        type=float,
        default=float(_env("TTL", "120") or 120),
        help="lease time in seconds (default 120)",
    )
    serve.add_argument(
        "--name", default=_env("NAME", "default"), help="pool name in the store (default 'default')"
    )
    serve.add_argument(
        "--dsn",
        default=_env("DSN", DEFAULT_STORE),
        help=f"store: postgresql://..., sqlite:///file.db or 'memory' (default {DEFAULT_STORE})",
    )
    serve.add_argument(
        "--durability", choices=("async", "sync"), default=_env("DURABILITY", "async")
    )
    serve.add_argument(
        "--flush-interval",
        type=float,
        default=float(_env("FLUSH_INTERVAL", "0.002") or 0.002),
        help="async mode: seconds the writer gathers changes before a commit (default 0.002)",
    )
    serve.add_argument(
        "--requirepass",
        default=_env("REQUIREPASS", None) or _env("PASSWORD", None),
        help="password clients must AUTH with (also TOKENPOOL_PASSWORD)",
    )
    serve.add_argument(
        "--tls-cert", default=_env("TLS_CERT", None), help="PEM certificate: serve TLS"
    )
    serve.add_argument(
        "--tls-key", default=_env("TLS_KEY", None), help="PEM private key for --tls-cert"
    )
    serve.add_argument(
        "--max-clients", type=int, default=int(_env("MAX_CLIENTS", "10000") or 10000)
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=float(_env("IDLE_TIMEOUT", "30") or 30),
        help="seconds a started command (or a blocked reply) may take before the client is dropped",
    )
    serve.add_argument(
        "--allow-insecure-bind",
        action="store_true",
        default=_env("ALLOW_INSECURE_BIND", "") in ("1", "true", "yes"),
        help="allow a non-loopback --host without --requirepass",
    )
    serve.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    serve.add_argument(
        "--log-format", default=_env("LOG_FORMAT", "auto"), choices=("auto", "json", "console")
    )
    return parser


def configure_logging(level: str, fmt: str) -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(args: argparse.Namespace) -> int:
    log = structlog.get_logger("tokenpool.cli")
    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            log.error("bad_settings", error="--tls-cert and --tls-key go together")
            return 2
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    if not _is_loopback(args.host) and not args.requirepass and not args.allow_insecure_bind:
        log.error(
            "bad_settings",
            error=f"refusing to listen on {args.host} without --requirepass;"
            " set a password or pass --allow-insecure-bind",
        )
        return 2
    store = None if args.dsn in ("memory", "none", "") else args.dsn
    settings = Settings(
        host=args.host,
        port=args.port,
        password=args.requirepass,
        max_clients=args.max_clients,
        idle_timeout=args.idle_timeout,
    )
    shown_store = store.split("@")[-1] if store else "memory"
    config = {
        "size": str(args.size),
        "ttl": f"{args.ttl:g}",
        "name": args.name,
        "durability": args.durability,
        "flush-interval": f"{args.flush_interval:g}",
        "store": shown_store,
        "maxclients": str(args.max_clients),
        "timeout": f"{args.idle_timeout:g}",
        "port": str(args.port),
        "bind": args.host,
        "tls": "yes" if ssl_context else "no",
        # redis-benchmark reads these two at start; the Redis persistence they
        # describe does not apply (the store is set by --dsn).
        "save": "",
        "appendonly": "no",
    }
    async with open_pool(
        size=args.size,
        ttl=args.ttl,
        name=args.name,
        store=store,
        durability=args.durability,
        flush_interval=args.flush_interval,
    ) as pool:
        server = RespServer(pool, settings, ssl_context=ssl_context, config=config)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                ports = await nursery.start(server.serve)
                config["port"] = str(ports[0])

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        log.info("shutting_down", signal=signal.Signals(signum).name)
                        server.shutdown()
                        # Busy connections finish their pipeline; none may take forever.
                        nursery.cancel_scope.deadline = trio.current_time() + settings.idle_timeout
                        return

                nursery.start_soon(stop_on_signal)
        await pool.flush()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return trio.run(serve, args)
    except TokenPoolError as error:
        structlog.get_logger("tokenpool.cli").error(
            "cannot_start", code=error.code, error=str(error)
        )
        return 1
    except OSError as error:
        structlog.get_logger("tokenpool.cli").error("cannot_start", error=str(error))
        return 1
