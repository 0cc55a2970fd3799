"""Reading a store's tables directly in tests, for PostgreSQL and SQLite alike."""

from __future__ import annotations

import sqlite3
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg


def _run(url: str, sql: str, params: tuple[Any, ...], fetch: bool) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            cursor = conn.execute(sql, params)
            return [tuple(r) for r in cursor.fetchall()] if fetch else []
    parts = urlsplit(url)
    query_args = dict(parse_qsl(parts.query))
    schema = query_args.pop("schema", "tokenpool")
    dsn = urlunsplit(parts._replace(query=urlencode(query_args)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        cursor = conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
        rows = cursor.fetchall() if fetch else []
    return [tuple(str(v) if type(v).__name__ == "UUID" else v for v in r) for r in rows]


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run ``sql`` (``?`` placeholders) against the store at ``url``; ids come back as str."""
    return _run(url, sql, params, fetch=True)


def execute(url: str, sql: str, *params: Any) -> None:
    """Run a statement that returns nothing."""
    _run(url, sql, params, fetch=False)
