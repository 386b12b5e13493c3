"""What endpoint code may raise or return to shape its HTTP answer.

Endpoint code runs in workers, so these classes live on the worker side
(``cruised.pool``, standard library only) and are re-exported as
``cruised.ApiError`` and ``cruised.CustomResponse``. Every endpoint module
also finds them as globals under their Dataiku names, so DSS endpoint code
runs unchanged:

* ``DkuCustomApiException(message, http_status_code=500)`` = ``ApiError``:
  the caller gets that status and ``{"errorType", "message",
  "detailedMessage"}``. Any exception with an integer attribute
  ``http_status_code`` between 400 and 599 is treated the same way, so the
  real ``dataiku`` class works too where it is installed.
* ``DkuCustomHttpResponse(status, body, headers)`` = ``CustomResponse``, with
  ``create_text_response``, ``create_json_response``,
  ``create_binary_response``, ``headers[...] = ...`` and ``add_header`` (for
  repeated headers such as Set-Cookie): the caller gets exactly that status,
  body and headers instead of the ``{"response": ..., "timing": ...}``
  envelope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from wsgiref.headers import Headers

#: header names are RFC 9110 tokens
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: the HTTP server frames the message itself: a function may not set these
_RESERVED = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer"}


class ApiError(Exception):
    """Raise from an endpoint to answer with ``http_status_code`` and ``message``.

    ``error_type`` becomes the ``errorType`` of the JSON error (default: the
    class name, so a subclass names its own kind of failure).
    """

    def __init__(self, message: str = "", http_status_code: int = 500, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status_code = http_status_code
        self.error_type = error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.http_status_code, self.error_type))


#: the Dataiku name, for endpoint code moved from a DSS API node
DkuCustomApiException = ApiError


class CustomResponse:
    """An HTTP response an endpoint returns as is (status, body, headers).

    ``body`` may be ``str`` (sent as UTF-8; default content type text/plain)
    or bytes (default application/octet-stream). ``headers`` is a
    ``wsgiref.headers.Headers``: ``resp.headers["X-A"] = "1"`` replaces,
    ``resp.add_header("Set-Cookie", "a=1")`` adds another.
    """

    def __init__(
        self, status: int = 200, body: str | bytes | bytearray | memoryview = b"", headers: dict[str, str] | Iterable[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        self.headers = Headers([(str(k), str(v)) for k, v in pairs])

    def add_header(self, name: str, value: str) -> None:
        self.headers.add_header(name, value)

    @classmethod
    def create_text_response(cls, text: str, content_type: str = "text/plain; charset=utf-8", status: int = 200) -> CustomResponse:
        return cls(status, text, {"Content-Type": content_type})

    @classmethod
    def create_json_response(cls, obj: Any, content_type: str = "application/json", status: int = 200) -> CustomResponse:
        from cruised.pool.jsonify import to_json

        return cls(status, to_json(obj), {"Content-Type": content_type})

    @classmethod
    def create_binary_response(cls, data: bytes | bytearray | memoryview, content_type: str = "application/octet-stream", status: int = 200) -> CustomResponse:
        return cls(status, bytes(data), {"Content-Type": content_type})

    def encode(self) -> tuple[dict[str, Any], bytes]:
        """(head ``{"status", "headers"}``, body bytes), checked; raises ValueError/TypeError saying what is wrong."""
        status = self.status
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"custom response status must be an integer from 200 to 599, got {status!r}")
        body = self.body
        if isinstance(body, str):
            raw = body.encode("utf-8")
            default_type = "text/plain; charset=utf-8"
        elif isinstance(body, (bytes, bytearray, memoryview)):
            raw = bytes(body)
            default_type = "application/octet-stream"
        else:
            raise TypeError(f"custom response body must be str or bytes, got {type(body).__name__}")
        if status in (204, 304) and raw:
            raise ValueError(f"a {status} response cannot have a body")
        pairs: list[list[str]] = []
        for name, value in self.headers.items():
            if not _TOKEN.match(name):
                raise ValueError(f"custom response header name {name!r} is not a valid HTTP token")
            if name.lower() in _RESERVED:
                raise ValueError(f"custom response header {name!r} is set by the server and cannot be overridden")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"custom response header {name!r} contains a line break or NUL")
            pairs.append([name, value])
        if raw and not any(n.lower() == "content-type" for n, _ in pairs):
            pairs.append(["Content-Type", default_type])
        return {"status": status, "headers": pairs}, raw


#: the Dataiku name, for endpoint code moved from a DSS API node
DkuCustomHttpResponse = CustomResponse


def http_status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception asks for (``http_status_code`` 400-599), else None."""
    code = getattr(exc, "http_status_code", None)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return None
