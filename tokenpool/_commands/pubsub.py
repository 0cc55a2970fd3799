"""Live events: which pool a channel names, and where a subscription resumes."""

from __future__ import annotations

from .._errors import InvalidArgumentError
from .._settings import REVISION, check_name

CHANNEL_PREFIX = "events:"


def parse_channel(channel: str) -> tuple[str, int | None]:
    """``events:<pool>`` or ``events:<pool>@<revision>`` (resume after that revision);
    the pool may be in braces, ``events:{<pool>}``: Redis's hash tag, so a cluster
    client computes the channel's slot as its pool's."""
    if not channel.startswith(CHANNEL_PREFIX):
        raise InvalidArgumentError(f"channels are events:<pool>[@<revision>], not {channel[:40]!r}")
    rest = channel[len(CHANNEL_PREFIX) :]
    since = None
    if "@" in rest:
        rest, _, revision = rest.partition("@")
        since = REVISION.parse(revision)
    if rest.startswith("{") and rest.endswith("}"):
        rest = rest[1:-1]
    return check_name(rest), since
