"""The RESP driver: RESP arguments to typed requests (``argv``), results to RESP
(``replies``), connection state and connection commands (``session``), what
``COMMAND`` says (``commands``), and the trio TCP/TLS loop (``server``)."""

from .server import RespServer, RespSettings, ServerStatistics

__all__ = ["RespServer", "RespSettings", "ServerStatistics"]
