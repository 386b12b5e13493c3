"""cruised: a warm pool of Python workers for kdb+ teams.

Public API (everything else is internal)::

    import cruised
    s = cruised.session()                # a remote daemon: session(host=, port=, tls=cruised.TLS(...))
    @cruised.function(s)
    def f(x): ...

Endpoint code may raise ``cruised.ApiError(message, http_status_code=404)``
or return ``cruised.CustomResponse(status, body, headers)``.
"""

__version__ = "0.1.0"

from cruised.client.errors import (
    CallCancelled,
    CruisedError,
    DaemonUnavailable,
    Draining,
    ExecutionTimeout,
    QConnectionError,
    QueueFull,
    QueueTimeout,
    RemoteError,
    WorkerCrashed,
)
from cruised.client.session import Session, function, session
from cruised.client.tls import TLS
from cruised.pool.api import ApiError, CustomResponse

__all__ = [
    "TLS",
    "ApiError",
    "CallCancelled",
    "CruisedError",
    "CustomResponse",
    "DaemonUnavailable",
    "Draining",
    "ExecutionTimeout",
    "QConnectionError",
    "QueueFull",
    "QueueTimeout",
    "RemoteError",
    "Session",
    "WorkerCrashed",
    "function",
    "session",
]
