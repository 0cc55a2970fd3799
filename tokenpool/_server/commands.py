"""What ``COMMAND`` says of each command: arity, flags, where its key (the pool) is,
and ``COMMAND DOCS``, so cluster-aware clients route by the pool and redis-cli can
show hints. Derived from the command table, never written twice."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .._resp import Error, Reply, Simple
from . import argv as table
from .session import CONNECTION


def _status(*words: str) -> list[Reply]:
    """Flags as Redis sends them: simple strings (``+write``), not bulk strings.
    redis-cli asserts it: given bulk strings it aborts as it starts (``COMMAND DOCS``)."""
    return [Simple(word) for word in words]


def _flags(spec: table.Spec) -> Any:
    if spec.write:
        return _status("write", "denyoom")
    return _status("readonly") if spec.slow else _status("readonly", "fast")


def _key_spec(write: bool) -> dict[str, Any]:
    return {
        "notes": "the pool",
        "flags": _status("RW", "UPDATE") if write else _status("RO", "ACCESS"),
        "begin_search": {"type": "index", "spec": {"index": 1}},
        "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}},
    }


def _entries() -> dict[str, list[Reply]]:
    out: dict[str, list[Reply]] = {}
    for spec in table.SPECS:
        if spec.pooled:
            # the default-pool form: no key (the server's own pool)
            arity = -(spec.low + 1) if spec.high > spec.low else spec.low + 1
            out[spec.name.lower()] = [
                spec.name.lower(),
                arity,
                _flags(spec),
                0,
                0,
                0,
                [],
                [],
                [],
                [],
            ]
            keyed = table.PREFIX + spec.name
            if keyed in table.KEYED:
                arity = -(spec.low + 2) if spec.high > spec.low else spec.low + 2
                out[keyed.lower()] = [
                    keyed.lower(),
                    arity,
                    _flags(spec),
                    1,
                    1,
                    1,
                    [],
                    [],
                    [_key_spec(spec.write)],
                    [],
                ]
        else:  # POOL <sub> <name>: the key follows the subcommand (GETKEYS finds it)
            out[spec.name.lower()] = [
                spec.name.lower(),
                -2,
                _status("write", "movablekeys"),
                0,
                0,
                0,
                [],
                [],
                [],
                [],
            ]
    for name, (low, high, _, _summary) in CONNECTION.items():
        arity = -(low + 1) if high > low else low + 1
        flags: Any = _status("noscript", "loading", "stale", "fast")
        if name in ("AUTH", "HELLO", "QUIT", "RESET"):
            flags.append(Simple("no_auth"))
        out[name.lower()] = [name.lower(), arity, flags, 0, 0, 0, [], [], [], []]
    return dict(sorted(out.items()))


_ENTRIES = _entries()


def command_names() -> list[Reply]:
    return list(_ENTRIES)


def command_info(names: list[str] | None) -> list[Reply]:
    if names is None:
        return list(_ENTRIES.values())
    return [_ENTRIES.get(n.lower()) for n in names]


def _arg(arg: table.Arg) -> dict[str, Reply]:
    out: dict[str, Reply] = {"name": arg.name, "type": arg.type, "display_text": arg.name}
    if arg.token:
        out["token"] = arg.token
    if arg.optional:
        out["flags"] = _status("optional")
    return out


def _docs() -> dict[str, dict[str, Reply]]:
    out: dict[str, dict[str, Reply]] = {}
    for spec in table.SPECS:
        args: Any = [_arg(a) for a in spec.args]
        base: dict[str, Reply] = {
            "summary": spec.summary,
            "since": __version__,
            "group": "generic",
            "complexity": spec.complexity,
        }
        if spec.pooled:
            out[spec.name.lower()] = {
                **base,
                "summary": spec.summary + " (the default pool)",
                "arguments": args,
            }
            keyed = table.PREFIX + spec.name
            if keyed in table.KEYED:
                pool: dict[str, Reply] = {
                    "name": "pool",
                    "type": "key",
                    "display_text": "pool",
                    "key_spec_index": 0,
                }
                out[keyed.lower()] = {**base, "arguments": [pool, *args]}
        else:
            out[spec.name.lower()] = {**base, "arguments": args}
    for name, (_low, _high, _fn, summary) in CONNECTION.items():
        out[name.lower()] = {"summary": summary, "since": "0.1.0", "group": "connection"}
    return dict(sorted(out.items()))


_DOCS = _docs()


def command_docs(names: list[str] | None) -> dict[str, Reply]:
    if names is None:
        return dict(_DOCS)
    return {n.lower(): _DOCS[n.lower()] for n in names if n.lower() in _DOCS}


def command_getkeys(argv: list[str], *, flags: bool) -> Reply:
    """The keys (pools) a command names, as ``COMMAND GETKEYS`` answers."""
    name = argv[0].upper()
    keys: list[Reply] = []
    if name in table.KEYED and len(argv) > 1:
        keys = [argv[1]]
    elif (
        name == "POOL" and len(argv) > 2 and argv[1].upper() in ("CREATE", "ALTER", "DROP", "INFO")
    ):
        keys = [argv[2]]
    if not keys:
        return Error("ERR", "The command has no key arguments")
    if flags:
        return [[k, ["RW"]] for k in keys]
    return keys
