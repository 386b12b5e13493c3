"""The HTTP fast path's request parser and answer rendering, without a daemon."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from multidict import CIMultiDict

from cruised.doors.http.app import error_response
from cruised.doors.http.fast import MAX_HEAD, _Request, parse_head, render, render_ok

LIMIT = 65536
CALL = b"POST /public/api/v1/svc/ep/run HTTP/1.1\r\nHost: cruised\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n"


def test_a_plain_call_is_parsed() -> None:
    req = parse_head(bytearray(CALL + b'{"x": 1}'), LIMIT)
    assert isinstance(req, _Request)
    assert (req.service, req.endpoint, req.authorization, req.close) == ("svc", "ep", None, False)
    assert (req.body_start, req.end) == (len(CALL), len(CALL) + 8)


def test_connection_close_and_authorization_are_read() -> None:
    head = CALL.replace(b"Host: cruised\r\n", b"Host: cruised\r\nconnection: keep-alive, Close\r\nAuthorization:  Bearer abc \r\n")
    req = parse_head(bytearray(head), LIMIT)
    assert isinstance(req, _Request) and req.close and req.authorization == "Bearer abc"


@pytest.mark.parametrize("partial", [CALL[:3], CALL[:25], CALL[:-2]])
def test_an_incomplete_head_waits_for_more(partial: bytes) -> None:
    assert parse_head(bytearray(partial), LIMIT) is None


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
        CALL.replace(b"\r\n", b"\n"),  # bare LF line ends, head not complete for the fast path
        b"POST /public/api/v1/svc/ep/run HTTP/1.1\r\nX: " + b"a" * MAX_HEAD,  # too long, unterminated
        b"\x16\x03\x01\x02\x00",  # TLS hello
    ],
)
def test_anything_else_goes_to_aiohttp(raw: bytes) -> None:
    assert parse_head(bytearray(raw), LIMIT) is False


def _parts(wire: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])], body


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("timing", [(0.0, 0.0, 0.0), (0.0004, 12.3456789, 1234.5678)])
def test_render_ok_is_what_aiohttp_writes_for_the_answer(timing: tuple[float, float, float], close: bool) -> None:
    """The fast path's 200, byte for byte the slow path's Response (HttpDoor.answer) as aiohttp writes it."""
    from cruised.doors.http.app import HttpDoor
    from cruised.pool.wire import frames as fr

    buf = bytearray(fr.HEADER_SIZE) + b'{"a":[1,"\\u00e9"]}'
    slow = web.Response(
        status=200, body=HttpDoor.ok_body(buf, timing), content_type="application/json", headers={"Server-Timing": HttpDoor.server_timing(timing)}
    )
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
    from cruised.doors.http.app import HttpDoor
    from cruised.pool.wire import frames as fr

    buf = bytearray(fr.HEADER_SIZE) + b'{"a": [1, 2.5, "x"]}'
    body = json.loads(HttpDoor.ok_body(buf, timing))
    assert body["response"] == {"a": [1, 2.5, "x"]}
    assert list(body["timing"]) == ["queue_ms", "exec_ms", "total_ms"]
    for got, want in zip(body["timing"].values(), timing, strict=True):
        assert got == pytest.approx(want, abs=0.0005)  # milliseconds to three decimals
