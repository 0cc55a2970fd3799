"""The stronger seed peer: the seed's design as a Python user builds it today, for the
``httpworkers`` section. FastAPI on uvicorn (httptools, uvloop) with 2 worker
processes, psycopg's connection pool (``psycopg_pool``, 10 connections a worker), one
PostgreSQL transaction per activation (``pg_pool.sql``'s ``activate``),
``synchronous_commit`` on as the seed has it.

Run by the bench: ``python -m bench.seed_uvicorn --port P --schema S`` (the workers
find the schema in ``SEED_SCHEMA``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from ._services import DSN
from .seed_http import lease_json

WORKERS = 2
CONNECTIONS = 10  # per worker
TTL = "120 s"


class ActivateIn(BaseModel):
    user_id: str


def create_app() -> FastAPI:
    """The app of one worker (uvicorn's ``factory``): its own pool of connections."""
    schema = os.environ["SEED_SCHEMA"]

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(f'SET search_path TO "{schema}"'.encode())
        await conn.commit()

    pool = AsyncConnectionPool(
        DSN, min_size=CONNECTIONS, max_size=CONNECTIONS, configure=configure, open=False
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.open(wait=True)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/tokens/activate")
    async def activate(body: ActivateIn) -> JSONResponse:
        async with pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT token_id, user_id, id, activated_at, expires_at"
                " FROM activate(%s, %s::interval)",
                (body.user_id, TTL),
            )
            row = await cursor.fetchone()
        assert row is not None
        return JSONResponse(lease_json(row))

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--schema", required=True)
    args = parser.parse_args()
    os.environ["SEED_SCHEMA"] = args.schema
    uvicorn.run(
        "bench.seed_uvicorn:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=WORKERS,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
