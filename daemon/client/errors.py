"""Typed errors, one class per way a call can fail, and their wire statuses.

Queue timeout, execution timeout and worker crash are different failures with
different remedies (add workers, raise the limit, fix the code), so each has
its own class and its own status on the wire. A failure inside the user's
function re-raises as the function's own exception type where it can be
unpickled, else as RemoteError; either way the remote traceback text is the
``__cause__``.
"""

from __future__ import annotations

from cruised.pool.wire.frames import Status


class CruisedError(Exception):
    """Base class of every error cruised raises."""

    status: int = Status.INTERNAL


class QueueFull(CruisedError):
    """The pool's queue was full: the request was rejected at once and never ran."""

    status = Status.QUEUE_FULL


class QueueTimeout(CruisedError):
    """The request waited longer than the pool's queue_timeout; it never ran."""

    status = Status.QUEUE_TIMEOUT


class ExecutionTimeout(CruisedError):
    """The call ran past its execution timeout; its worker was killed and replaced."""

    status = Status.EXEC_TIMEOUT


class WorkerCrashed(CruisedError):
    """The worker died during the call (exit code or signal in the message). Not re-run."""

    status = Status.WORKER_CRASHED


class CallCancelled(CruisedError):
    """The call was cancelled (Ctrl-C, ``Future.cancel()``, a closed ``map``). The client that
    cancels a call drops its answer, so this is seen only by code that reads replies itself."""

    status = Status.CANCELLED


class RemoteError(CruisedError):
    """The function raised an exception that could not be re-created in the client."""

    status = Status.ERROR

    def __init__(self, message: str, type_name: str = "", traceback_text: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.traceback_text = traceback_text


class DaemonUnavailable(CruisedError):
    """No daemon answers on the socket (or the connection was lost)."""


class ShuttingDown(CruisedError):
    status = Status.SHUTTING_DOWN


class Draining(ShuttingDown):
    """The daemon is draining (``cruised drain``): the call never ran; send it to another daemon or
    retry after ``cruised ready``. A ShuttingDown, so code that handles a stopping daemon handles this too."""

    status = Status.DRAINING


class NoSuchPool(CruisedError):
    status = Status.NO_SUCH_POOL


class BadRequest(CruisedError):
    status = Status.BAD_REQUEST


class VersionMismatch(CruisedError):
    """The pool's Python minor version differs from the client's; bytecode cannot cross."""

    status = Status.VERSION_MISMATCH


class AccessDenied(CruisedError):
    status = Status.ACCESS_DENIED


class QConnectionError(CruisedError):
    """The worker could not reach its q process."""

    status = Status.Q_UNAVAILABLE


class ConfigError(CruisedError):
    """A configuration file failed validation; ``path`` is the key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


BY_STATUS: dict[int, type[CruisedError]] = {
    cls.status: cls
    for cls in (
        QueueFull,
        QueueTimeout,
        ExecutionTimeout,
        WorkerCrashed,
        ShuttingDown,
        Draining,
        NoSuchPool,
        BadRequest,
        VersionMismatch,
        AccessDenied,
        QConnectionError,
        CallCancelled,
    )
}
