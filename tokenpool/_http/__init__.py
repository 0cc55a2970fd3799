"""The HTTP driver: the seed's REST API, ``/metrics``, health, live events and the dashboard.

An ASGI app (FastAPI, served by hypercorn's trio worker in the server's own trio
run). Each route builds a typed request from its validated input
(``schemas``), executes it through the command layer (``app``), and encodes
the neutral result as JSON (``replies``); ``routes`` is one ``APIRouter`` of
the pool's routes mounted under ``/api`` and ``/api/pools/{pool}``;
``events`` streams Server-Sent Events; ``middleware`` bounds bodies and times
requests; ``serving`` runs hypercorn.

Cost before work: request bodies are bounded before they are read; long
listings are formatted a slice at a time with a checkpoint between, and
encoded in a worker thread, at most two at once; event streams are bounded in
number and each has a bounded buffer in the pool (a slow reader gets an
``overflow`` event, never slows the pool).
"""

from .app import HttpApp, HttpSettings, HttpStatistics
from .serving import serve_http

__all__ = ["HttpApp", "HttpSettings", "HttpStatistics", "serve_http"]
