"""Redis's glob patterns (``SCAN ... MATCH``, ``CONFIG GET``, ``PSUBSCRIBE``), their cost
checked before any work.

Python's ``fnmatch`` turns a pattern into a regular expression in time that grows with
the square of its ``[`` (30,000 of them held the event loop, and every client, for 12 s;
the 64 KiB argument bound allowed about 50 s). A pattern is at most ``MAX_PATTERN``
characters, where the translation takes well under a millisecond; Redis's own
patterns, key and channel names, are far shorter. The translation is cached, so a
pattern a subscriber or a scan repeats is compiled once.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Final

from ._errors import InvalidArgumentError

MAX_PATTERN: Final = 1024


def check_pattern(pattern: str, what: str = "a pattern") -> str:
    """``pattern``, or ``InvalidArgumentError`` if it is too long to match cheaply."""
    if len(pattern) > MAX_PATTERN:
        raise InvalidArgumentError(
            f"{what} is at most {MAX_PATTERN:,} characters (this one has {len(pattern):,})"
        )
    return pattern


@functools.lru_cache(maxsize=256)
def matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a name matches ``pattern`` (case-sensitive, as Redis). Checks the length."""
    match = re.compile(fnmatch.translate(check_pattern(pattern))).match
    return lambda name: match(name) is not None
