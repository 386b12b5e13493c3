"""Logging: one event per line, JSON lines, the access log and its switch, secrets masked."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cruised.ops import logs
from support.daemon import Daemon, pool_config, wait_for


def chatty(x: int) -> int:
    print("connecting with password=hunter2 to http://ann:s3cret@db.example:5000/", flush=True)
    print("hopen `:kdbhost:5001:ann:pa55word", file=sys.stderr, flush=True)
    return x * 2


def boom() -> None:
    raise RuntimeError("bad input")


def _record(msg: str, *args: object, level: int = logging.INFO, name: str = "cruised.test", exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("inner\nproblem")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


# -- formatters ---------------------------------------------------------------------------


def test_text_lines_are_single_lines_even_with_tracebacks() -> None:
    line = logs.TextFormatter().format(_record("first\nsecond %s", "x", exc=True))
    assert "\n" not in line
    assert "first\\nsecond x" in line and "Traceback" in line and "ValueError: inner\\nproblem" in line
    assert " INFO cruised.test: " in line


def test_json_lines_carry_fields_and_escape_newlines() -> None:
    fields = {"pool": "default", "queue_ms": 0.5, "peer": {"pid": 1, "uid": 2, "gid": 3}}
    line = logs.JsonFormatter().format(_record("a\nb", name="cruised.access", exc=True, fields=fields))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["msg"] == "a\nb" and obj["level"] == "info" and obj["logger"] == "cruised.access"
    assert obj["pool"] == "default" and obj["queue_ms"] == 0.5 and obj["peer"] == {"pid": 1, "uid": 2, "gid": 3}
    assert obj["ts"].endswith("Z") and "ValueError" in obj["exc"]


@pytest.mark.parametrize(
    "text, secret",
    [
        ("login password=hunter2 ok", "hunter2"),
        ("db_password: 'two words'", "two words"),
        ("API_KEY=abc123&x=1", "abc123"),
        ("Authorization: Bearer.xyz", "Bearer.xyz"),
        ("url http://ann:s3cret@db:5000/x", "s3cret"),
        ("hopen `:kdbhost:5001:ann:pa55word", "pa55word"),
    ],
)
def test_secrets_are_masked(text: str, secret: str) -> None:
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        out = formatter.format(_record("%s", text))
        assert secret not in out and "***" in out, out


def test_ordinary_lines_are_not_masked() -> None:
    for text in (
        "worker=default-1 pool=default ready pid=42 in 3.1ms",
        "pool=default endpoint=svc/predict outcome=ok queue_ms=0.1 exec_ms=2.0 peer=pid:1,uid:2,gid:3",
        "listening on /run/cruised/cruised.sock (pid 7, python 3.11.7)",
        "connect to :kdbhost:5001",
    ):
        assert logs.redact(text) == text


def test_journal_stream_gets_priority_prefixes(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.stderr_is_journal(stream, {})
    f = logs.TextFormatter(journal=True)
    assert f.format(_record("hi", level=logging.ERROR)) == "<3>cruised.test: hi"
    assert f.format(_record("hi", level=logging.INFO)) == "<6>cruised.test: hi"


def test_setup_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="text, json"):
        logs.setup("info", "xml", io.StringIO())


def test_access_log_line() -> None:
    from cruised.core.dispatch import Job
    from support.fakes import observe_one

    class Client:
        peer = (11, 22, 33)

    stream = io.StringIO()
    logger = logging.getLogger("cruised.access.unit")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        access = logs.AccessLog(logger)
        job = Job(id=1, kind=1, frame=bytearray(), sink=None, client=Client(), client_reqid=1, endpoint="svc/e")  # type: ignore[arg-type]  # a test Client and a raw kind: the fields logging reads
        observe_one(access, "p", job, "rejected", 0.0, None)
        observe_one(access, "p", job, "ok", 0.0012, 0.5)
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "pool=p endpoint=svc/e outcome=rejected queue_ms=0.000 exec_ms=- peer=pid:11,uid:22,gid:33"
    assert first["exec_ms"] is None and first["peer"] == {"pid": 11, "uid": 22, "gid": 33}
    assert second["outcome"] == "ok" and second["queue_ms"] == 1.2 and second["exec_ms"] == 500.0


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_access_lines_match_the_logging_path_and_keep_order(fmt: str) -> None:
    """The hot-path access log renders the same line as a logging record would, batched per loop turn."""
    from cruised.core.dispatch import Job
    from support.fakes import observe_one

    class Client:
        peer = (11, 22, 33)

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    direct_out, slow_out = io.StringIO(), io.StringIO()
    scheduled: list[Callable[[], None]] = []

    def call_later(delay: float, cb: Callable[[], None]) -> None:
        assert delay == logs.ACCESS_FLUSH_S
        scheduled.append(cb)

    job = Job(id=1, kind=1, frame=bytearray(), sink=None, client=Client(), client_reqid=1, endpoint="svc/e")  # type: ignore[arg-type]  # a test Client and a raw kind: the fields logging reads
    try:
        logs.setup("info", fmt, slow_out)
        observe_one(logs.AccessLog(), "p", job, "ok", 0.0012, 0.5)  # no call_soon: an ordinary record
        handler = logs.setup("info", fmt, direct_out)
        access = logs.AccessLog(call_later=call_later)
        observe_one(access, "p", job, "ok", 0.0012, 0.5)
        observe_one(access, "p", job, "rejected", 0.0, None)
        assert direct_out.getvalue() == "" and len(scheduled) == 1  # queued, one write scheduled
        logging.getLogger("cruised.test").warning("something else")  # another record writes the queue first
        observe_one(access, "p", job, "ok", 0.0, 0.1)
        scheduled[-1]()
        assert isinstance(handler, logs.StderrHandler) and not handler.queued
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = direct_out.getvalue().splitlines()
    assert len(lines) == 4 and "something else" in lines[2]

    def strip_time(line: str) -> object:
        if fmt == "json":
            obj = json.loads(line)
            obj.pop("ts")
            return obj
        return line.split(" ", 1)[1]

    assert strip_time(lines[0]) == strip_time(slow_out.getvalue().splitlines()[0])
    assert "outcome=rejected" in lines[1] or json.loads(lines[1])["outcome"] == "rejected"


def test_a_queued_line_that_cannot_be_rendered_costs_only_itself() -> None:
    out = io.StringIO()
    handler = logs.StderrHandler(out)

    def broken(item: tuple[object, ...]) -> str:
        raise KeyError("boom")

    handler.queue_line("first", lambda delay, cb: None)
    handler.queue_line((broken, 1), lambda delay, cb: None)
    handler.queue_line((lambda item: f"rendered {item[1]}", 2), lambda delay, cb: None)
    handler.flush()
    assert out.getvalue().splitlines() == [
        "first",
        "cruised.logs: an access line could not be rendered: KeyError: 'boom'",
        "rendered 2",
    ]


# -- the real daemon ---------------------------------------------------------------------------


def test_json_logs_access_lines_and_tagged_worker_output(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"pools": {"default": pool_config()}}, args=["--log-format", "json"])
    with d.session() as s:
        assert s.call(chatty, 21) == 42
        with pytest.raises(RuntimeError):
            s.call(boom)
    wait_for(lambda: "kdbhost" in d.log() and d.log().count('"cruised.access"') >= 2, what="worker output and access lines")
    records = [json.loads(line) for line in d.log().splitlines() if line.strip()]  # every line is one JSON event
    access = [r for r in records if r["logger"] == "cruised.access"]
    assert [r["outcome"] for r in access] == ["ok", "error"]
    for r in access:
        assert r["pool"] == "default" and r["endpoint"] == "function"
        assert r["peer"]["pid"] == os.getpid() and r["peer"]["uid"] == os.getuid()
        assert r["queue_ms"] >= 0 and r["exec_ms"] >= 0
    output = [r["msg"] for r in records if "output:" in r["msg"]]
    assert any(m.startswith("worker=default-") and "password=***" in m for m in output), output
    assert any(":kdbhost:5001:ann:***" in m for m in output), output
    text = d.log()
    for secret in ("hunter2", "s3cret", "pa55word"):
        assert secret not in text


def test_access_log_can_be_switched_off(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"daemon": {"access_log": False}, "pools": {"default": pool_config()}})
    with d.session() as s:
        assert s.call(chatty, 1) == 2
        assert s.metrics()  # still counted, only not logged
    wait_for(lambda: "kdbhost" in d.log(), what="the worker's output")
    assert "cruised.access" not in d.log()


def test_access_log_config_is_validated(tmp_path: Path) -> None:
    from cruised import config

    with pytest.raises(config.ConfigErrors, match=re.escape("daemon.access_log: expected true or false")):
        config.parse({"daemon": {"access_log": "no"}})
