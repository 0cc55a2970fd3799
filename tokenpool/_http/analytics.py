"""The routes of usage over time, mounted beside the pool's routes (``/api`` and
``/api/pools/{pool}``): the sampled series (``/series``) and the reports over the
store's history (``/analytics/{report}``, JSON or CSV)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response

from .._commands.analytics import (
    MAX_OFFSET,
    Report,
    Series,
    check_moment,
    parse_unix_seconds,
)
from .._errors import InvalidArgumentError, TokenPoolError
from .._model import to_us
from .._store.analytics import LIMIT_MAX, REPORTS, Table
from .routes import Authed
from .schemas import ErrorCodes, api_error

router = APIRouter()

When = Annotated[
    str | None,
    Query(
        max_length=40,
        description="ISO 8601 (2026-12-06T19:00:00Z) or Unix seconds; a lease counts in"
        " the range it ended in",
    ),
]


def parse_time(value: str | None, what: str) -> int | None:
    """Microseconds since the Unix epoch from ISO 8601 or Unix seconds (``None`` stays)."""
    if value is None or value == "":
        return None
    if value[:1].isdigit() and value.isascii() and "-" not in value and ":" not in value:
        return parse_unix_seconds(value, what)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgumentError(
            f"{what} must be ISO 8601 (2026-12-06T19:00:00Z) or Unix seconds, not {value!r}"
        ) from None
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=UTC)
    return check_moment(to_us(moment.astimezone(UTC)), what)


@router.get(
    "/series",
    responses={
        **ErrorCodes,
        200: {
            "description": "`{pool, step, start, values: {field: [number|null]}}`: one value"
            " a `step` seconds from `start` (Unix seconds), oldest first; null where"
            " nothing was sampled"
        },
    },
)
async def series(
    call: Authed, window: Annotated[Literal["hour", "day"], Query()] = "hour"
) -> Response:
    """The pool's figures over the last hour (a second a value) or day (a minute a
    value): tokens held, size, grants and ended leases by reason a second, refusals a
    second, callers waiting, their mean wait (s) and the write lag (s)."""
    owner = call.owner
    data = await owner.execute(Series(call.pool, window), call.client)
    return await owner.reply({"data": data}, 1_000 if window == "day" else 4_000)


@router.get(
    "/analytics/{report}",
    responses={
        **ErrorCodes,
        200: {
            "description": "`{report, pool, since, until, columns, rows, next_cursor}`, or"
            " CSV with a header line (`format=csv`)",
            "content": {"text/csv": {}},
        },
    },
)
async def analytics(
    call: Authed,
    report: Annotated[str, Path(description=f"one of {', '.join(REPORTS)}", max_length=20)],
    since: When = None,
    until: When = None,
    limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 100,
    cursor: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="the next_cursor")] = 0,
    sort: Annotated[str | None, Query(max_length=20)] = None,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Response:
    """A usage report over the leases of the pool that ended in `[since, until)` (by
    default the last day): `summary` (leases, hold time mean/p50/p90/max, share ended
    by each reason), `users` and `tokens` (per user or token: leases, hold time, how
    each ended; `sort=leases|hold|evicted`), `hours` (per hour: `sort=time|leases`).
    404 NOTKEPT on a server without a store."""
    try:
        command = Report(
            call.pool,
            report,
            parse_time(since, "since"),
            parse_time(until, "until"),
            limit,
            cursor,
            sort,
        )
    except TokenPoolError as error:
        raise api_error(error) from None
    table: Table = await call.owner.execute(command, call.client)
    if format == "csv":
        return Response(
            table_csv(table),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="{call.pool}-{report}.csv"',
                **({"X-Next-Cursor": str(table.next_cursor)} if table.next_cursor else {}),
            },
        )
    return JSONResponse({"data": table_json(command, table)})


def table_json(command: Report, table: Table) -> dict[str, Any]:
    from .._model import iso

    return {
        "report": command.kind,
        "pool": command.pool,
        "since": iso(command.since),
        "until": iso(command.until),
        "sort": command.sort,
        "columns": list(table.columns),
        "rows": [dict(zip(table.columns, row, strict=True)) for row in table.rows],
        "next_cursor": table.next_cursor,
    }


def table_csv(table: Table) -> str:
    """The table as CSV; a text cell a spreadsheet would read as a formula (a user id
    may start with ``=``) is quoted with a leading ``'`` (OWASP's CSV injection sheet)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["'" + v if isinstance(v, str) and v[:1] in _FORMULA else v for v in row])
    return out.getvalue()


_FORMULA = ("=", "+", "-", "@", "\t", "\r")
