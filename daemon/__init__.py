"""cruised: a warm pool of Python workers for kdb+ teams.

Public API (everything else is internal)::

    import cruised
    s = cruised.session()
    @cruised.function(s)
    def f(x): ...

Endpoint code may raise ``cruised.ApiError(message, http_status_code=404)``
or return ``cruised.CustomResponse(status, body, headers)``.
"""

__version__ = "0.1.0"

from cruised.pool.api import ApiError, CustomResponse  # noqa: E402

from .client import Session, function, session  # noqa: E402
from .errors import (  # noqa: E402
    CruisedError,
    DaemonUnavailable,
    ExecutionTimeout,
    QConnectionError,
    QueueFull,
    QueueTimeout,
    RemoteError,
    WorkerCrashed,
)

__all__ = [
    "session",
    "function",
    "Session",
    "CruisedError",
    "QueueFull",
    "QueueTimeout",
    "ExecutionTimeout",
    "WorkerCrashed",
    "RemoteError",
    "DaemonUnavailable",
    "QConnectionError",
    "ApiError",
    "CustomResponse",
]
