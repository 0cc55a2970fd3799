"""The seed's own stack shape, for the HTTP benchmark's baseline: a REST endpoint that
runs one PostgreSQL transaction per activation (``pg_pool.sql``'s ``activate``).

FastAPI on hypercorn's asyncio worker, psycopg's async connections (20, shared
through a queue), ``synchronous_commit`` on as the seed has it. Run by the bench:
``python -m bench.seed_http --port P --schema S``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import psycopg
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypercorn.asyncio import serve
from hypercorn.config import Config
from pydantic import BaseModel

from ._services import DSN

CONNECTIONS = 20
TTL = "120 s"


class ActivateIn(BaseModel):
    user_id: str


def lease_json(row: Any) -> dict[str, Any]:
    """The seed's reply to an activation, from ``activate()``'s row."""
    return {
        "data": {
            "token_id": str(row[0]),
            "user_id": row[1],
            "id": str(row[2]),
            "activated_at": row[3].isoformat(),
            "expires_at": row[4].isoformat(),
        }
    }


def make_app(connections: list[psycopg.AsyncConnection]) -> FastAPI:
    app = FastAPI()
    ready: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()
    for conn in connections:
        ready.put_nowait(conn)

    @app.post("/api/tokens/activate")
    async def activate(body: ActivateIn) -> JSONResponse:
        conn = await ready.get()
        try:
            async with conn.transaction():
                cursor = await conn.execute(
                    "SELECT token_id, user_id, id, activated_at, expires_at"
                    " FROM activate(%s, %s::interval)",
                    (body.user_id, TTL),
                )
                row = await cursor.fetchone()
        finally:
            ready.put_nowait(conn)
        assert row is not None
        return JSONResponse(lease_json(row))

    return app


async def _serve(port: int, schema: str) -> None:
    connections = []
    for _ in range(CONNECTIONS):
        conn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
        await conn.execute(f'SET search_path TO "{schema}"'.encode())
        connections.append(conn)
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    await serve(make_app(connections), config)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--schema", required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.schema))


if __name__ == "__main__":
    main()
