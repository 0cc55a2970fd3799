"""The command line: every setting checked once where it enters, one line when refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpool import InvalidArgumentError
from tokenpool._cli import OPTIONS, build_parser, fd_budget, load_config

ROOT = Path(__file__).resolve().parent.parent
VALUED = [o for o in OPTIONS if not o.flag and "password" not in o.name and "file" not in o.name]
EXTREMES = [
    "",
    " ",
    "0",
    "-1",
    "1e-7",
    "1e300",
    "1e12",
    "inf",
    "-inf",
    "nan",
    "70000",
    "²",
    "٣",
    "1_0",
    "0x10",
    "9" * 5000,
    "-0",
    "+5",
    "a/b",
    "\x00",
    "x" * 5000,
    "1.5",
    "10",
    "evict",
    "sync",
]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenpool", "serve", "--port", "0", "--http-port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@settings(max_examples=400, deadline=None)
@given(
    option=st.sampled_from(VALUED), value=st.one_of(st.sampled_from(EXTREMES), st.text(max_size=20))
)
def test_any_value_of_any_setting_is_taken_or_refused_with_its_name(option, value: str) -> None:  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["serve", f"--{option.name}={value}"])
    try:
        config = load_config(args, {})
    except InvalidArgumentError as error:
        assert f"--{option.name}" in str(error)
        assert "\n" not in str(error)
        return
    assert config.values[option.dest] == option.check(value, option.name)


@settings(max_examples=100, deadline=None)
@given(option=st.sampled_from(VALUED), value=st.sampled_from(EXTREMES))
def test_the_environment_is_checked_the_same_way_and_named(option, value: str) -> None:  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["serve"])
    env = {option.envs[0]: value}
    try:
        load_config(args, env)
    except InvalidArgumentError as error:  # named by its variable (or, paired, by its flag)
        assert option.envs[0] in str(error) or f"--{option.name}" in str(error)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--ttl", "inf"], "--ttl"),
        (["--ttl", "1e300"], "--ttl"),
        (["--ttl", "1e12"], "--ttl"),
        (["--ttl", "1e-7"], "--ttl"),
        (["--flush-interval", "-1"], "--flush-interval"),
        (["--idle-timeout", "-1"], "--idle-timeout"),
        (["--max-clients", "0"], "--max-clients"),
        (["--port", "70000"], "--port"),
        (["--name", "a/b"], "--name"),
        (["--dsn", ""], "--dsn"),
        (["--dsn", "postgresql://u:secret@h:99999/db"], "--dsn"),
        (["--dsn", "postgresql://u@h:abc/db"], "--dsn"),
        (["--dsn", "postgresql://u@[::1/db"], "--dsn"),
        (["--dsn", "postgresql://u@h/db?nonsense=1"], "--dsn"),
        (["--size", "²"], "--size"),
        (["--when-full", "panic"], "--when-full"),
    ],
)
def test_a_bad_setting_stops_the_program_with_one_line(args: list[str], named: str) -> None:
    out = run("--dsn", "memory", *args) if args[0] != "--dsn" else run(*args)
    assert 2 == out.returncode
    lines = out.stderr.strip().splitlines()
    assert 1 == len(lines), out.stderr
    assert named in lines[0] and "Traceback" not in out.stderr
    assert "secret" not in out.stderr


def test_a_bad_environment_value_names_the_variable() -> None:
    out = run("--dsn", "memory", env={"TOKENPOOL_TTL": "1e300"})
    assert 2 == out.returncode
    assert "TOKENPOOL_TTL" in out.stderr and 1 == len(out.stderr.strip().splitlines())


def test_pools_come_from_a_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "pools.toml"
    config.write_text(
        '[server]\nport = 0\ndsn = "memory"\n\n'
        "[pools.default]\nsize = 4\nttl = 30\n\n"
        '[pools.gpu]\nsize = 2\nttl = 3600\nwhen_full = "wait"\nmin_hold = 60\n\n'
        "[pools.capped]\nsize = 1\nttl = 60\nmax_lifetime = 600\n\n"
        "[pools.uncapped]\nsize = 1\nttl = 60\nmax_lifetime = 0\n"  # 0: none, as the flag
    )
    args = build_parser().parse_args(["serve", "--config", str(config)])
    loaded = load_config(args, {})
    assert ["default", "gpu", "capped", "uncapped"] == list(loaded.pools)
    assert (600.0, None) == (
        loaded.pools["capped"].max_lifetime,
        loaded.pools["uncapped"].max_lifetime,
    )
    assert (4, 30.0) == (loaded.pools["default"].size, loaded.pools["default"].ttl)
    assert ("wait", 60.0) == (loaded.pools["gpu"].when_full, loaded.pools["gpu"].min_hold)
    args = build_parser().parse_args(["serve", "--config", str(config), "--size", "9"])
    assert 9 == load_config(args, {}).pools["default"].size  # the command line wins


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[pools.gpu]\nsize = 0\nttl = 1\n", "size"),
        ("[pools.gpu]\nsize = 1\nttl = 1\ncolour = 'red'\n", "colour"),
        ("[pools.'a/b']\nsize = 1\nttl = 1\n", "pool name"),
        ("[server]\nport = 'x'\n", "port"),
        ("[server]\nport = '19010'\n", "port in"),  # a number as text: as a pool table does
        ("[server]\nrate-limit = '5'\n", "must be a number, not a string"),
        ("[server]\nallow-insecure-bind = 'yes'\n", "a TOML boolean"),
        ("[server]\ncluster-renew = 0.5\n", "--cluster-renew needs --node-id"),
        ("[server]\nwarp = 9\n", "warp"),
        ("not toml at all = = =", "TOML"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = run("--config", str(config), "--dsn", "memory")
    assert 2 == out.returncode
    assert message in out.stderr and 1 == len(out.stderr.strip().splitlines()), out.stderr


@pytest.mark.parametrize("flag", ["--cluster-renew", "--cluster-validity"])
def test_a_cluster_setting_without_cluster_mode_is_refused(flag: str) -> None:
    out = run(flag, "6", "--dsn", "memory")
    assert 2 == out.returncode
    assert f"{flag} needs --node-id" in out.stderr, out.stderr


def test_a_config_files_numbers_and_flags_are_taken_as_toml_types(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[server]\nport = 19010\nrate-limit = 2.5\nallow-insecure-bind = true\n")
    values = load_config(build_parser().parse_args(["serve", "--config", str(config)]), {}).values
    assert (19010, 2.5, True) == (
        values["port"],
        values["rate_limit"],
        values["allow_insecure_bind"],
    )


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokenpool",
                "serve",
                "--port",
                str(port),
                "--dsn",
                "memory",
                "--log-format",
                "console",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert 2 == out.returncode
    assert f"port {port}" in out.stderr and "in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unusable_data_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = run("--dsn", f"sqlite:///{tmp_path}/file/pool.db", "--log-format", "console")
    assert 1 == out.returncode
    assert "cannot open the SQLite file" in out.stderr and "Traceback" not in out.stderr


def test_a_password_on_the_command_line_is_warned_about() -> None:
    args = build_parser().parse_args(["serve", "--requirepass", "pw"])
    config = load_config(args, {})
    assert any("TOKENPOOL_PASSWORD" in w for w in config.warnings)
    assert (
        []
        == load_config(build_parser().parse_args(["serve"]), {"TOKENPOOL_PASSWORD": "pw"}).warnings
    )


def test_a_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    args = build_parser().parse_args(["serve", "--requirepass-file", str(secret)])
    assert "from-a-file" == load_config(args, {}).requirepass


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"server = 5\n", "'server' must be a table"),
        (b"[[pools]]\nsize = 1\n", "'pools' must be a table"),
        (b"pools = 'gpu'\n", "'pools' must be a table"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8"),
        ("[server]\nname = 'caf\u00e9'\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_every_config_file_shape_error_is_one_line(
    tmp_path: Path, data: bytes, message: str
) -> None:
    """Shapes TOML allows but a config cannot be, and bytes that are not text: one line,
    exit 2 (they used to end in a traceback)."""
    config = tmp_path / "bad.toml"
    config.write_bytes(data)
    out = run("--config", str(config), "--dsn", "memory")
    assert 2 == out.returncode
    assert message in out.stderr and 1 == len(out.stderr.strip().splitlines()), out.stderr


def test_a_password_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes("caf\u00e9\n".encode("latin-1"))
    out = run("--requirepass-file", str(secret), "--dsn", "memory")
    assert 2 == out.returncode
    assert "--requirepass-file" in out.stderr and "not UTF-8" in out.stderr, out.stderr
    assert 1 == len(out.stderr.strip().splitlines()), out.stderr


def test_a_password_in_the_environment_that_is_not_utf8_is_refused() -> None:
    """os.environ decodes non-UTF-8 bytes as lone surrogates: such a password could never
    match what a client sends, so the server refuses to start with it."""
    out = subprocess.run(
        [sys.executable, "-m", "tokenpool", "serve", "--port", "0", "--http-port", "0"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        env={**os.environb, b"TOKENPOOL_PASSWORD": "caf\u00e9".encode("latin-1")},
    )
    stderr = out.stderr.decode()
    assert 2 == out.returncode, stderr
    assert "TOKENPOOL_PASSWORD" in stderr and "not UTF-8" in stderr, stderr
    assert 1 == len(stderr.strip().splitlines()), stderr


def test_the_fd_budget_lowers_max_clients_to_what_the_hard_limit_allows() -> None:
    assert (10_064, 10_000, None) == fd_budget(10_000, False, 1024, 1 << 20)
    assert (20_064, 10_000, None) == fd_budget(10_000, True, 1024, 1 << 20)
    assert (4096, 100, None) == fd_budget(100, True, 4096, 4096)  # never lowered
    limit, fits, warning = fd_budget(10_000, False, 1024, 1024)
    assert (1024, 960) == (limit, fits) and warning is not None and "960" in warning
    assert (1024, 480) == fd_budget(10_000, True, 1024, 1024)[:2]
    with pytest.raises(InvalidArgumentError, match="open-file limit"):
        fd_budget(10, False, 64, 64)


FLAGS = ("--dsn", "memory", "--log-format", "json")


def _serve_limited(nofile: int, *args: str, script: str = "") -> tuple[subprocess.Popen[str], int]:
    """A server process whose open-file limit (soft and hard) is ``nofile``, and its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))\n"
        f"import tokenpool._cli as cli\n{script}\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--port",
            str(port),
            "--http-port",
            "0",
            *FLAGS,
            *args,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(process.communicate()[1])


def _clients(port: int, count: int) -> list[bytes]:
    """``count`` connections held open at once; each one's answer to PING."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        answers = []
        for sock in socks:
            sock.sendall(b"PING\r\n")
        for sock in socks:
            answers.append(sock.recv(100))
        return answers
    finally:
        for sock in socks:
            sock.close()


def test_max_clients_is_reconciled_with_the_open_file_limit() -> None:
    """--max-clients 10000 under a hard limit of 200 files serves 136 clients (200 less
    the reserve), says so in one JSON line, and tells the 137th why it is refused."""
    process, port = _serve_limited(200, "--max-clients", "10000")
    try:
        answers = _clients(port, 140)
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=30)
    assert [b"+PONG\r\n"] * 136 == answers[:136]
    assert [b"-ERR max number of clients reached\r\n"] * 4 == answers[136:]
    lowered = [json.loads(line) for line in err.splitlines() if "max_clients_lowered" in line]
    assert 136 == lowered[0]["max_clients"]


def test_out_of_file_descriptors_a_client_is_refused_and_one_json_line_logged() -> None:
    """When accept fails with EMFILE (descriptors taken by something else than clients),
    the client gets the max-clients error instead of hanging, and the log has one JSON
    line, not a traceback per attempt."""
    process, port = _serve_limited(100, "--max-clients", "1000", script="cli.RESERVED_FDS = 1")
    try:
        answers = _clients(port, 110)
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=30)
    assert b"+PONG\r\n" == answers[0]
    refused = answers.index(b"-ERR max number of clients reached\r\n")
    assert 50 < refused < 100
    assert all(a in (b"+PONG\r\n", b"-ERR max number of clients reached\r\n") for a in answers)
    assert "Traceback" not in err
    failed = [json.loads(line) for line in err.splitlines() if "accept_failed" in line]
    assert 1 == len(failed), err
    assert "EMFILE" == failed[0]["error"]


def test_a_taken_port_is_said_before_the_store_is_touched(tmp_path: Path) -> None:
    """The RESP port is asked for before recovery: a taken one costs no takeover of the
    pools (no store process, no epoch bumped), and no HTTP port is bound meanwhile."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                *(sys.executable, "-m", "tokenpool", "serve", "--port", str(port)),
                *("--dsn", f"sqlite:///{tmp_path}/p.db", "--http-port", "0"),
                *("--log-format", "json"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert 2 == out.returncode
    events = [json.loads(line)["event"] for line in out.stderr.splitlines() if line.strip()]
    assert "cannot_start" in events
    assert "store_process_started" not in events, events
    assert not (tmp_path / "p.db").exists()


@pytest.mark.parametrize("value", ["-1", "0.0001", "abc", "inf"])
def test_a_bad_rate_is_named_as_a_rate_not_as_seconds(value: str) -> None:
    args = build_parser().parse_args(["serve", f"--rate-limit={value}"])
    with pytest.raises(InvalidArgumentError) as caught:
        load_config(args, {})
    message = str(caught.value)
    assert "--rate-limit must be 0 (off) or a number a second" in message
    assert "seconds" not in message and value in message


def test_the_http_servers_own_errors_are_json_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn logs an unexpected error of the app ("Exception in ASGI application", a
    traceback) on its own logger: a worker wrote it as plain text past the JSON lines."""
    import logging

    from tokenpool._cli import configure_logging

    loggers = [logging.getLogger(n) for n in ("tokenpool", "uvicorn", "hypercorn")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    try:
        configure_logging("info", "json")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        lines = [line for line in capsys.readouterr().err.splitlines() if line]
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
    (line,) = lines  # one JSON line, the traceback inside it
    record = json.loads(line)
    assert "Exception in ASGI application" == record["event"]
    assert "RuntimeError: boom" in record["exception"]
