"""The local side of a node's lease: until when it may serve, grant and vouch.

Pure: the caller passes monotonic times. The database sets a lease's end with its
own clock (``expires_at = now() + validity``, ``now()`` being when the renewing
transaction began, which is after the renewal was sent). This node counts the same
validity on its own monotonic clock **from when it sent the renewal**, so the time
the request spent in flight and in the database only shortens the lease here, and
stops ``margin`` before the end: enough for the two clocks to run at rates that
differ by ``DRIFT`` and for a request checked just before the end to be applied.
Another node takes a slot over only once the database's clock says the lease has
expired, so this node has stopped first.
"""

from __future__ import annotations

import math

DRIFT = 0.01
"""The most two clocks' rates may differ, as a fraction: 1% (NTP keeps a slewed clock
within 0.05%; a virtual machine's can be worse)."""
SCHEDULING = 0.05
"""Seconds between a check that the lease is valid and the change it allows."""


def margin(validity: float) -> float:
    """How long before the database's end of a lease this node stops using it."""
    return validity * DRIFT + SCHEDULING


class LocalLease:
    """Until when (monotonic seconds) this node may use its lease."""

    __slots__ = ("deadline", "validity")

    def __init__(self, validity: float) -> None:
        self.validity = validity
        self.deadline = -math.inf

    def renewed(self, sent: float) -> None:
        """A renewal sent at ``sent`` (monotonic) committed: the lease runs until
        ``sent + validity - margin``."""
        self.deadline = max(self.deadline, sent + self.validity - margin(self.validity))

    def lost(self) -> None:
        """The database says the lease ended (another node may hold what it covered)."""
        self.deadline = -math.inf

    def valid(self, now: float) -> bool:
        return now < self.deadline

    def left(self, now: float) -> float:
        """Seconds of validity left at ``now`` (negative once it ran out)."""
        return self.deadline - now
