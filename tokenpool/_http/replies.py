"""Neutral results as JSON: ``null`` where a value is missing, times as ISO-8601."""

from __future__ import annotations

from typing import Any

import attrs

from .._commands import Granted, PoolInfo, TokenInfo
from .._model import FENCE, ID, START, STOP, USER, LeaseRecord, Stats, Usage, iso, to_us


def lease_json(granted: Granted) -> dict[str, Any]:
    lease = granted.lease
    out: dict[str, Any] = {
        "id": lease[ID],
        "token_id": granted.token_id,
        "user_id": lease[USER],
        "fence": lease[FENCE],
        "activated_at": iso(lease[START]),
        "expires_at": iso(lease[STOP]),
    }
    if granted.revision is not None:
        out["revision"] = granted.revision
    return out


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "id": usage.id,
        "token_id": usage.token_id,
        "user_id": usage.user_id,
        "started_at": iso(to_us(usage.started_at)),
        "ended_at": iso(to_us(usage.ended_at)),
        "reason": usage.reason.value,
        "revision": usage.revision,
        "fence": usage.fence,
    }


def token_json(token: TokenInfo) -> dict[str, Any]:
    lease = token.lease
    return {
        "id": token.token_id,
        "status": "available" if lease is None else "active",
        "current_user_id": None if lease is None else lease[USER],
        "activated_at": None if lease is None else iso(lease[START]),
        "expires_at": None if lease is None else iso(lease[STOP]),
    }


def active_usage(record: LeaseRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "id": record[ID],
        "user_id": record[USER],
        "started_at": iso(record[START]),
        "expires_at": iso(record[STOP]),
        "fence": record[FENCE],
    }


def stats_json(stats: Stats) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in attrs.fields(Stats):
        value = getattr(stats, field.name)
        if field.name == "last_commit_at" and value is not None:
            value = iso(to_us(value))
        out[field.name] = value
    return out


def pool_json(info: PoolInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "settings": info.settings.as_dict(),
        "stats": stats_json(info.stats),
    }
