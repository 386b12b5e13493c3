"""Logging for the daemon: stderr, one event per line, text or JSON lines, the access log.

Everything goes to stderr through ``logging``; systemd's journal, a container
runtime or a terminal collects it. Three rules hold for every line:

* one event per line: newlines inside a message or a traceback are escaped
  (``\\n``) in text mode and JSON-escaped in JSON mode, so a multi-line
  traceback never splits into lines that look like separate events;
* secrets are masked: ``password=...``-style pairs and credentials in URLs
  (``scheme://user:secret@host``, kdb+ ``:host:port:user:secret``) are
  replaced by ``***`` before a line is written, whoever produced it (a worker
  printing its connection string included). The daemon itself never logs
  payloads, arguments or configuration values;
* under systemd (``$JOURNAL_STREAM`` names our stderr) text lines carry a
  ``<N>`` syslog-priority prefix and no timestamp, so ``journalctl -p err``
  works and the journal's own timestamps are not doubled.

Access log
    ``AccessLog`` is a dispatcher Observer: one line per answered request on
    logger ``cruised.access`` (pool, endpoint, outcome, queue_ms, exec_ms,
    peer). ``daemon.access_log: false`` leaves it detached. In JSON mode the
    same values appear as fields of the record, not only in its text.
    It is on the hot path, so under the daemon's own handler it skips the
    ``logging`` machinery (a LogRecord, a lock and a write per line cost
    ~45 µs, a third of the supervisor's CPU per call): the dispatcher hands
    it answered requests in batches of ``Answered`` records
    (daemon/core/observers.py: 64, or 20 ms), ``StderrHandler`` queues each
    batch's values and writes the queue in one ``write`` at most every
    ``ACCESS_FLUSH_S`` (a write per request was still a tenth of a sync
    call's supervisor CPU), rendering the lines with the formatter then, so
    a request's own path only appends a tuple. Any
    other record written through the handler first writes the queued lines,
    so the stream keeps the order of events, except that an access line can
    follow a line logged up to 20 ms after its answer; ``flush``
    (logging.shutdown, a clean exit) writes them too, and the daemon hands
    over its last batches before it stops, so only a killed daemon can lose
    the last few.

Worker output is captured per worker by the launcher and logged line by line
with a ``worker=`` tag (daemon/core/launcher.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from cruised.core.observers import Answered

FORMATS = ("text", "json")
ACCESS_LOGGER = "cruised.access"
#: access lines wait at most this long (seconds) to be written together
ACCESS_FLUSH_S = 0.05
LEVELS = ("debug", "info", "warning", "error")

_SECRET_PAIR = re.compile(
    r"(?i)\b((?:[a-z0-9_.-]*?)(?:password|passwd|pwd|secret|token|api[_-]?key|auth(?:orization)?))(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&\"']+)"
)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+):[^@\s/]+@")
#: kdb+ connection strings: `:host:port:user:password (hopen) -> keep host, port and user
_KDB_CREDS = re.compile(r"(`?:[\w.-]*:\d+:[^:\s`\"']+):[^\s`\"']+")
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def redact(text: str) -> str:
    """Mask credentials in a log line (cheap enough for every line: three regex passes)."""
    if "=" in text or ":" in text:
        text = _SECRET_PAIR.sub(r"\1\2***", text)
        text = _URL_USERINFO.sub(r"\1:***@", text)
        text = _KDB_CREDS.sub(r"\1:***", text)
    return text


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n") if ("\n" in text or "\r" in text) else text


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123 INFO cruised.dispatch: message``, one line, redacted."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__(datefmt="%Y-%m-%dT%H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg} | {self.formatException(record.exc_info)}"
        elif record.exc_text:
            msg = f"{msg} | {record.exc_text}"
        # access lines are built from pool/endpoint names and numbers only: skip the regexes on the hot path
        msg = _one_line(msg if record.name == ACCESS_LOGGER else redact(msg))
        if self.journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{record.name}: {msg}"
        return f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d} {record.levelname} {record.name}: {msg}"

    _stamp_second = -1
    _stamp = ""

    def access_line(self, msg: str, fields: dict[str, Any] | None, now: float) -> str:
        """The line ``format`` would give an INFO record of ``cruised.access`` (no redaction: see format)."""
        msg = _one_line(msg)
        if self.journal:
            return f"<6>{ACCESS_LOGGER}: {msg}"
        second = int(now)
        if second != self._stamp_second:  # strftime once a second, not once a request
            self._stamp = time.strftime(self.datefmt or "%Y-%m-%dT%H:%M:%S", self.converter(second))
            self._stamp_second = second
        return f"{self._stamp}.{int((now - second) * 1000):03d} INFO {ACCESS_LOGGER}: {msg}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        out: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name, "msg": msg if record.name == ACCESS_LOGGER else redact(msg)}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, redact(v) if isinstance(v, str) else v)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)

    def access_line(self, msg: str, fields: dict[str, Any] | None, now: float) -> str:
        """The line ``format`` would give an INFO record of ``cruised.access`` carrying ``fields``."""
        assert fields is not None
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int((now % 1) * 1000):03d}Z"
        out: dict[str, Any] = {"ts": ts, "level": "info", "logger": ACCESS_LOGGER, "msg": msg}
        for k, v in fields.items():
            out.setdefault(k, v)
        return json.dumps(out, ensure_ascii=False, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]  # StreamHandler[TextIO] is subscriptable at run time only from Python 3.11
    """The daemon's one handler: a StreamHandler that can also take pre-rendered lines in batches.

    ``queue_line`` is called from the event loop only. Queued lines (or batches
    of access lines) are written by ``write_queued``: ``ACCESS_FLUSH_S`` after
    the first of them, when 256 are waiting, before any other record, and on
    ``flush`` (so ``logging.shutdown`` loses nothing).
    """

    MAX_QUEUED = 256

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        #: lines, or ``(render, *values)`` tuples rendered by ``render(item)`` when written
        self.queued: list[str | tuple[Any, ...]] = []
        self._scheduled = False

    def queue_line(self, line: str | tuple[Any, ...], call_later: Callable[[float, Callable[[], None]], object]) -> None:
        self.queued.append(line)
        if len(self.queued) >= self.MAX_QUEUED:
            self.write_queued()
        elif not self._scheduled:
            self._scheduled = True
            call_later(ACCESS_FLUSH_S, self.write_queued)

    def write_queued(self) -> None:
        self._scheduled = False
        if not self.queued:
            return
        queued, self.queued = self.queued, []
        lines: list[str] = []
        for x in queued:
            if isinstance(x, str):
                lines.append(x)
                continue
            try:
                lines.append(x[0](x))
            except Exception as exc:  # noqa: BLE001 - a renderer bug must cost neither the other lines nor the daemon
                lines.append(f"cruised.logs: an access line could not be rendered: {type(exc).__name__}: {exc}")
        text = "\n".join(lines) + "\n"
        self.acquire()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # noqa: BLE001 - stderr gone (EPIPE): like StreamHandler, never let logging break the daemon
            pass
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if self.queued:
            self.write_queued()
        super().emit(record)

    def flush(self) -> None:
        if self.queued:
            self.write_queued()
        super().flush()


def stderr_is_journal(stream: TextIO = sys.stderr, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True if ``stream`` is the journal stream systemd connected (sd_journal_stream_fd semantics)."""
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Install the one stderr handler on the root logger; return it."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    stream = stream or sys.stderr
    handler = StderrHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journal=stderr_is_journal(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)  # Python warnings become one-line events too, not raw stderr text
    return handler


def _direct_handler(logger: logging.Logger) -> tuple[StderrHandler, TextFormatter | JsonFormatter] | None:
    """The handler access lines may be queued on: the root's only handler, if it is ours, with our formatter and no filters in the way."""
    if logger.handlers or logger.filters or not logger.propagate:
        return None
    parent = logger.parent
    while parent is not None and parent is not logging.root:  # cruised.access -> cruised -> root
        if parent.handlers or parent.filters or not parent.propagate:
            return None
        parent = parent.parent
    handlers = logging.root.handlers
    if len(handlers) != 1 or not isinstance(handlers[0], StderrHandler) or handlers[0].filters or logging.root.filters:
        return None
    fmt = handlers[0].formatter
    if not isinstance(fmt, (TextFormatter, JsonFormatter)):
        return None
    return handlers[0], fmt


def format_peer(client: Any) -> tuple[str, Any]:
    """(text, JSON value) of whoever sent a job: a native client's (pid, uid, gid), or the door's own form."""
    peer = getattr(client, "peer", None)
    if isinstance(peer, tuple) and len(peer) == 3:
        pid, uid, gid = peer
        return f"pid:{pid},uid:{uid},gid:{gid}", {"pid": pid, "uid": uid, "gid": gid}
    if peer is None:
        return "-", None
    return str(peer), str(peer)


def _access_message(pool: str, endpoint: str, outcome: str, queue_s: float, exec_s: float | None, client: Any) -> str:
    """An access line's message. Times are milliseconds with three decimals, formatted directly:
    ``round`` and then ``repr`` cost three times as much, and this runs for every request."""
    peer_text = getattr(client, "peer_text", None) or format_peer(client)[0]  # a native connection renders it once
    exec_text = "-" if exec_s is None else f"{exec_s * 1e3:.3f}"
    return f"pool={pool} endpoint={endpoint} outcome={outcome} queue_ms={queue_s * 1e3:.3f} exec_ms={exec_text} peer={peer_text}"


def _access_fields(pool: str, endpoint: str, outcome: str, queue_s: float, exec_s: float | None, client: Any) -> dict[str, Any]:
    """An access line's values as JSON fields (the text line carries the same in its message)."""
    exec_ms = round(exec_s * 1e3, 3) if exec_s is not None else None
    return {"pool": pool, "endpoint": endpoint, "outcome": outcome, "queue_ms": round(queue_s * 1e3, 3), "exec_ms": exec_ms, "peer": format_peer(client)[1]}


class AccessLog:
    """Observer: one ``cruised.access`` line per answered request.

    With ``call_later`` (the event loop's) and the daemon's ``StderrHandler`` on
    the root logger, lines are rendered by its formatter and queued on it (see
    the module docstring); otherwise (tests, embedding) they go through
    ``logging`` as ordinary records.
    """

    def __init__(self, logger: logging.Logger | None = None, call_later: Callable[[float, Callable[[], None]], object] | None = None) -> None:
        self.log = logger or logging.getLogger(ACCESS_LOGGER)
        self.call_later = call_later
        self._direct: tuple[StderrHandler, TextFormatter | JsonFormatter] | None = None
        if call_later is not None and logger is None:
            self._direct = _direct_handler(self.log)

    def requests_done(self, pool: str, batch: list[Answered]) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        direct = self._direct
        if direct is not None and self.call_later is not None:
            # the values now, the text when the queue is written: off the requests' path
            direct[0].queue_line((self._render, pool, batch), self.call_later)
            return
        for endpoint, _, client, _, outcome, queue_s, exec_s, _, _ in batch:  # Answered, in field order
            msg = _access_message(pool, endpoint, outcome, queue_s, exec_s, client)
            self.log.info("%s", msg, extra={"fields": _access_fields(pool, endpoint, outcome, queue_s, exec_s, client)})

    def _render(self, item: tuple[Any, ...]) -> str:
        """A queued batch's lines, as the ``logging`` path above would have written them."""
        assert self._direct is not None
        _, pool, batch = item
        fmt = self._direct[1]
        text = isinstance(fmt, TextFormatter)
        lines = []
        for endpoint, _, client, _, outcome, queue_s, exec_s, at, _ in batch:  # Answered, in field order
            msg = _access_message(pool, endpoint, outcome, queue_s, exec_s, client)
            fields = None if text else _access_fields(pool, endpoint, outcome, queue_s, exec_s, client)
            lines.append(fmt.access_line(msg, fields, at))
        return "\n".join(lines)

    def worker_exit(self, pool: str, reason: str) -> None:
        pass  # exits are logged by the dispatcher itself, with the worker tag
