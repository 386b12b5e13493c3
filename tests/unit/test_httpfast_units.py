"""The HTTP fast path's request reader (llhttp through httptools) and answer rendering, without a daemon."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from multidict import CIMultiDict

from cruised.doors.http.fast import MAX_HEAD, HandOff, Request, RequestReader, render, render_ok
from cruised.doors.http.steps import error_response, ok_body, server_timing

LIMIT = 65536
CALL = b"POST /public/api/v1/svc/ep/run HTTP/1.1\r\nHost: cruised\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n"


def _head(raw: bytes, reader: RequestReader | None = None) -> Request | None:
    return (reader or RequestReader()).head(bytearray(raw), LIMIT)


def test_a_plain_call_is_parsed() -> None:
    req = _head(CALL + b'{"x": 1}')
    assert isinstance(req, Request)
    assert (req.service, req.endpoint, req.authorization, req.close) == ("svc", "ep", None, False)
    assert (req.body_start, req.end) == (len(CALL), len(CALL) + 8)


def test_connection_close_and_authorization_are_read() -> None:
    head = CALL.replace(b"Host: cruised\r\n", b"Host: cruised\r\nconnection: keep-alive, Close\r\nAuthorization:  Bearer abc \r\n")
    req = _head(head)
    assert isinstance(req, Request) and req.close and req.authorization == "Bearer abc"


@pytest.mark.parametrize("partial", [CALL[:3], CALL[:25], CALL[:-2]])
def test_an_incomplete_head_waits_for_more(partial: bytes) -> None:
    assert _head(partial) is None


def test_one_reader_reads_request_after_request() -> None:
    """The parser sees every byte of each request it serves (head, then body), so the next head starts clean."""
    reader = RequestReader()
    empty = CALL.replace(b"Content-Length: 8", b"Content-Length: 0").replace(b"/svc/ep/", b"/svc/two/")
    buf = bytearray(CALL + b'{"x": 1}' + empty + CALL + b"12345678")
    served = []
    while buf:
        req = reader.head(buf, LIMIT)
        assert req is not None and len(buf) >= req.end
        reader.finish(buf, req)
        served.append((req.endpoint, bytes(buf[req.body_start : req.end])))
        del buf[: req.end]
    assert served == [("ep", b'{"x": 1}'), ("two", b""), ("ep", b"12345678")]


def test_a_body_cut_short_by_the_buffer_is_not_finished() -> None:
    reader = RequestReader()
    buf = bytearray(CALL + b'{"x": 1}')
    req = reader.head(buf, LIMIT)
    assert req is not None
    req.end -= 1  # as if the reader were told a shorter body than the head says: llhttp has not seen the end
    with pytest.raises(RuntimeError, match="Content-Length"):
        reader.finish(buf, req)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /status HTTP/1.1\r\n\r\n",
        b"PUT /public/api/v1/svc/ep/run HTTP/1.1\r\n\r\n",
        CALL.replace(b"HTTP/1.1", b"HTTP/1.0"),
        CALL.replace(b"/svc/", b"/s%76c/"),  # percent-escape: aiohttp's router decodes it
        CALL.replace(b"/run ", b"/run?x=1 "),
        CALL.replace(b"/svc/", b"/../"),
        CALL.replace(b"Content-Length: 8", b"Content-Length: 8\r\nContent-Length: 8"),
        CALL.replace(b"Content-Length: 8", b"Content-Length: +8"),
        CALL.replace(b"Content-Length: 8", b"Transfer-Encoding: chunked"),
        CALL.replace(b"Content-Length: 8", b"Content-Length: 8\r\nExpect: 100-continue"),
        CALL.replace(b"Content-Length: 8", b"Content-Length: 8\r\nConnection: Upgrade\r\nUpgrade: h2c"),
        CALL.replace(b"Content-Length: 8", b"Content-Length: %d" % (LIMIT + 1)),
        CALL.replace(b"Content-Length: 8\r\n", b""),  # no length
        CALL.replace(b"Host: cruised\r\n", b"Host: cruised\r\n folded\r\n"),
        CALL.replace(b"Host: cruised\r\n", b"Host : cruised\r\n"),
        CALL.replace(b"Host: cruised\r\n", b"X: caf\xc3\xa9\r\n"),
        CALL.replace(b"Host: cruised\r\n", b"X: a\x01b\r\n"),  # a control character in a value
        CALL.replace(b"Host: cruised\r\n", b"X: a\rb\r\n"),  # a bare CR
        CALL.replace(b"Host: cruised\r\n", b": empty name\r\n"),
        CALL.replace(b"Host: cruised\r\n", b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"),
        CALL.replace(b"HTTP/1.1", b"HTTP/2.0"),
        CALL.replace(b"HTTP/1.1", b"HTTP/1.1 "),
        CALL.replace(b"Content-Length: 8", b"Content-Length: 99999999999999999999999"),
        CALL.replace(b"Content-Length: 8", b"Content-Length: 8\r\nConnection: keep-alive, foo"),
        CALL.replace(b"/svc/", b"/s\x80c/"),
        CALL.replace(b"/run ", b"/run#x "),
        CALL.replace(b"/svc/", b"/./"),
        CALL.replace(b"/public/", b"//public/"),
        CALL.replace(b"POST /public/api/v1/svc/ep/run", b"POST /public/api/v1/svc/ep/run/"),
        CALL.replace(b"POST /public/api/v1/svc/ep/run", b"POST /public/api/v1/svc/ep/x/run"),
        b"\r\n" + CALL,  # a blank line first
        CALL.replace(b"\r\n", b"\n"),  # bare LF line ends, head not complete for the fast path
        CALL.replace(b"Host: cruised\r\n", b"Host: cruised\n"),  # one bare LF, the head otherwise complete
        b"POST /public/api/v1/svc/ep/run HTTP/1.1\r\nX: " + b"a" * MAX_HEAD,  # too long, unterminated
        b"\x16\x03\x01\x02\x00",  # TLS hello
    ],
)
def test_anything_else_goes_to_aiohttp(raw: bytes) -> None:
    with pytest.raises(HandOff):
        _head(raw)


def test_a_hand_off_after_calls_on_the_same_reader() -> None:
    """A connection's later request can still be handed off (pipelined after plain calls)."""
    reader = RequestReader()
    buf = bytearray(CALL + b'{"x": 1}')
    req = reader.head(buf, LIMIT)
    assert req is not None
    reader.finish(buf, req)
    with pytest.raises(HandOff):
        reader.head(bytearray(CALL.replace(b"Content-Length: 8", b"Transfer-Encoding: chunked")), LIMIT)


def _parts(wire: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])], body


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("timing", [(0.0, 0.0, 0.0), (0.0004, 12.3456789, 1234.5678)])
def test_render_ok_is_what_aiohttp_writes_for_the_answer(timing: tuple[float, float, float], close: bool) -> None:
    """The fast path's 200, byte for byte the slow path's Response (Steps.answer) as aiohttp writes it."""
    from cruised.pool.wire import frames as fr

    buf = bytearray(fr.HEADER_SIZE) + b'{"a":[1,"\\u00e9"]}'
    slow = web.Response(status=200, body=ok_body(buf, timing), content_type="application/json", headers={"Server-Timing": server_timing(timing)})
    wire = render_ok(memoryview(buf)[fr.HEADER_SIZE :], timing, close)
    assert wire == render(slow, close)
    status, headers, body = _parts(wire)
    assert status == "HTTP/1.1 200 OK" and json.loads(body)["response"] == {"a": [1, "é"]}
    assert [k for k, _ in headers][:5] == ["Server-Timing", "Content-Type", "Content-Length", "Date", "Server"]
    assert int(dict(headers)["Content-Length"]) == len(body)
    assert (headers[-1] == ("Connection", "close")) is close


def test_render_error_and_custom_answers() -> None:
    resp = error_response(503, "QueueFull", "full", headers={"Retry-After": "1"})
    status, headers, body = _parts(render(resp, close=False))
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert [k for k, _ in headers] == ["Retry-After", "Content-Type", "Content-Length", "Date", "Server"]
    assert body == resp.body and dict(headers)["Content-Length"] == str(len(resp.body))
    custom = web.Response(status=299, body=b"a,b", headers=CIMultiDict([("X-A", "1"), ("X-A", "2"), ("Content-Type", "text/csv"), ("Server", "mine")]))
    status, headers, body = _parts(render(custom, close=True))
    assert status == "HTTP/1.1 299 " and body == b"a,b"
    assert headers[:4] == [("X-A", "1"), ("X-A", "2"), ("Content-Type", "text/csv"), ("Server", "mine")]
    assert [k for k, _ in headers[4:]] == ["Content-Length", "Date", "Connection"]
    no_content = _parts(render(web.Response(status=204, body=b""), close=False))[1]
    assert "Content-Length" not in dict(no_content)


@pytest.mark.parametrize("timing", [(0.0, 0.0, 0.0), (0.0004, 12.3456789, 1234.5678), (1e-9, 3e5, 0.0005)])
def test_ok_body_is_json_with_the_response_and_millisecond_timing(timing: tuple[float, float, float]) -> None:
    from cruised.pool.wire import frames as fr

    buf = bytearray(fr.HEADER_SIZE) + b'{"a": [1, 2.5, "x"]}'
    body = json.loads(ok_body(buf, timing))
    assert body["response"] == {"a": [1, 2.5, "x"]}
    assert list(body["timing"]) == ["queue_ms", "exec_ms", "total_ms"]
    for got, want in zip(body["timing"].values(), timing, strict=True):
        assert got == pytest.approx(want, abs=0.0005)  # milliseconds to three decimals
