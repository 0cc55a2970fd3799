"""The command line: every setting checked once where it enters, one line when refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpool import InvalidArgumentError
from tokenpool._cli import OPTIONS, build_parser, load_config

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
        '[pools.gpu]\nsize = 2\nttl = 3600\nwhen_full = "wait"\nmin_hold = 60\n'
    )
    args = build_parser().parse_args(["serve", "--config", str(config)])
    loaded = load_config(args, {})
    assert ["default", "gpu"] == list(loaded.pools)
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
