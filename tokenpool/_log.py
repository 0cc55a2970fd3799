"""Logging for the library: structured events through the standard library's ``logging``.

A library must print nothing unless the application configures logging, and
structlog's own default prints to stdout. So every module logs through
``get_logger``: a structlog logger bound to a stdlib logger under
``tokenpool``, which has a ``NullHandler``. Events (with their key/value
fields in ``extra``) reach whatever handlers the application sets up; the CLI
is the only place that sets one up (``_cli.configure_logging``).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

logging.getLogger("tokenpool").addHandler(logging.NullHandler())


def get_logger(name: str) -> Any:
    """A structlog logger writing to the stdlib logger ``name`` (``tokenpool.*``)."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.render_to_log_kwargs],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
