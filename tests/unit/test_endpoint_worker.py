"""Endpoints inside one worker, without a daemon: loading, parameter binding, replies (pool/endpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cruised.pool import api, endpoint
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Status
from support.httphelp import write

LIMIT = 1 << 20


def load(tmp_path: Path, source: str, function: str, folders: list[str] | None = None, base: dict[str, Any] | None = None) -> dict[str, endpoint.Endpoint]:
    code = write(tmp_path / f"{function}_code.py", source)
    return endpoint.load_all({"s/e": {"code": code, "function": function, "folders": folders or []}}, base or {"__builtins__": __builtins__})


def run(eps: dict[str, endpoint.Endpoint], body: bytes, name: str = "s/e") -> tuple[int, Any]:
    status, parts = endpoint.handle(eps, frames.endpoint_frame(name, body), LIMIT)
    raw = b"".join(bytes(p) for p in parts)
    if status in (Status.ERROR, Status.CUSTOM_RESPONSE):
        head, rest = frames.parse_error(raw, 0)
        return status, (json.loads(head), bytes(rest))
    return status, json.loads(raw)


def test_globals_folders_and_pool_names(tmp_path: Path) -> None:
    eps = load(
        tmp_path,
        """
        def f():
            return {"folders": folders, "np": np_alias, "exc": DkuCustomApiException.__name__, "resp": DkuCustomHttpResponse.__name__}
        """,
        "f",
        folders=["/data/a", "/data/b"],
        base={"__builtins__": __builtins__, "np_alias": "numpy-module", "__name__": "__cruised__"},
    )
    assert run(eps, b"") == (Status.OK, {"folders": ["/data/a", "/data/b"], "np": "numpy-module", "exc": "ApiError", "resp": "CustomResponse"})


def test_binding_rules(tmp_path: Path) -> None:
    eps = load(tmp_path, "def f(a, b=2, *args, c, d=4, **kw):\n    return [a, b, c, d, kw]\n", "f")
    assert run(eps, b'{"a": 1, "c": 3}') == (Status.OK, [1, 2, 3, 4, {}])
    assert run(eps, b'{"a": 1, "c": 3, "zz": 9}') == (Status.OK, [1, 2, 3, 4, {"zz": 9}])
    status, info = run(eps, b'{"b": 1}')
    assert status == Status.BAD_ARGUMENTS and info["missing"] == ["a", "c"] and info["unexpected"] == []
    assert "missing required parameters 'a', 'c'" in info["message"]
    strict = load(tmp_path, "def g(x):\n    return x\n", "g")
    status, info = run(strict, b'{"x": 1, "y": 2, "z": 3}')
    assert status == Status.BAD_ARGUMENTS and info["unexpected"] == ["y", "z"]


def test_positional_only_required_parameter_cannot_load(tmp_path: Path) -> None:
    eps = load(tmp_path, "def f(a, /):\n    return a\n", "f")
    assert eps["s/e"].fn is None and "positional-only" in (eps["s/e"].error or "")
    status, info = run(eps, b"{}")
    assert status == Status.ENDPOINT_UNAVAILABLE and "positional-only" in info["message"]


def test_failures_at_load_are_per_endpoint(tmp_path: Path) -> None:
    good = write(tmp_path / "good.py", "def f():\n    return 1\n")
    bad = write(tmp_path / "bad.py", "import sys\nsys.exit(3)\n")
    notfn = write(tmp_path / "notfn.py", "f = 3\n")
    eps = endpoint.load_all(
        {
            "s/good": {"code": good, "function": "f"},
            "s/bad": {"code": bad, "function": "f"},
            "s/notfn": {"code": notfn, "function": "f"},
            "s/nofile": {"code": str(tmp_path / "gone.py"), "function": "f"},
        },
        {"__builtins__": __builtins__},
    )
    report = endpoint.report(eps)
    assert report["s/good"]["ok"] is True
    assert report["s/bad"] == {"ok": False, "error": "SystemExit: 3", "traceback": report["s/bad"]["traceback"]}
    assert "bad.py" in report["s/bad"]["traceback"]
    assert "is a int, not a function" in report["s/notfn"]["error"]
    assert report["s/nofile"]["error"].startswith("FileNotFoundError")
    assert run(eps, b"", "s/good") == (Status.OK, 1)


def test_errors_and_api_errors(tmp_path: Path) -> None:
    eps = load(
        tmp_path,
        """
        class Mine(Exception):
            http_status_code = 409

        def f(kind):
            if kind == "api":
                raise DkuCustomApiException("nope", http_status_code=403)
            if kind == "duck":
                raise Mine("conflict")
            if kind == "exit":
                raise SystemExit(2)
            raise KeyError(kind)
        """,
        "f",
    )
    assert run(eps, b'{"kind": "api"}') == (Status.API_ERROR, {"http_status": 403, "errorType": "ApiError", "message": "nope", "detailedMessage": "nope"})
    assert run(eps, b'{"kind": "duck"}')[1]["http_status"] == 409
    status, (info, _) = run(eps, b'{"kind": "x"}')
    assert status == Status.ERROR and info["errorType"] == "FunctionError" and info["type"] == "KeyError"
    assert "in f" in info["traceback"] and "endpoint.py" not in info["traceback"]
    status, (info, _) = run(eps, b'{"kind": "exit"}')  # a function may not end its worker
    assert status == Status.ERROR and info["type"] == "SystemExit"


def test_custom_responses(tmp_path: Path) -> None:
    eps = load(
        tmp_path,
        """
        def f(kind):
            if kind == "json":
                return DkuCustomHttpResponse.create_json_response({"a": 1}, status=202)
            if kind == "bin":
                return DkuCustomHttpResponse.create_binary_response(b"\\x00\\x01", content_type="image/png")
            if kind == "direct":
                return DkuCustomHttpResponse(200, "Hello", {"X-A": "1"})
            if kind == "badheader":
                return DkuCustomHttpResponse(200, "x", {"Content-Length": "3"})
            return DkuCustomHttpResponse(99, "x")
        """,
        "f",
    )
    assert run(eps, b'{"kind": "json"}') == (Status.CUSTOM_RESPONSE, ({"status": 202, "headers": [["Content-Type", "application/json"]]}, b'{"a":1}'))
    assert run(eps, b'{"kind": "bin"}')[1] == ({"status": 200, "headers": [["Content-Type", "image/png"]]}, b"\x00\x01")
    assert run(eps, b'{"kind": "direct"}')[1] == ({"status": 200, "headers": [["X-A", "1"], ["Content-Type", "text/plain; charset=utf-8"]]}, b"Hello")
    status, (info, _) = run(eps, b'{"kind": "badheader"}')
    assert status == Status.ERROR and info["errorType"] == "InvalidCustomResponse" and "Content-Length" in info["message"]
    status, (info, _) = run(eps, b'{"kind": "status"}')
    assert info["errorType"] == "InvalidCustomResponse" and "200 to 599" in info["message"]


def test_unknown_endpoint_in_pool(tmp_path: Path) -> None:
    status, info = run({}, b"{}", "x/y")
    assert status == Status.ENDPOINT_UNAVAILABLE and "not configured in this pool" in info["message"]


def test_api_error_pickles_with_its_status() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(api.ApiError("m", 404, "Missing")))
    assert (err.message, err.http_status_code, err.error_type) == ("m", 404, "Missing")
    assert api.http_status_of(err) == 404
    assert api.http_status_of(api.ApiError("m", 302)) is None
    assert api.http_status_of(ValueError()) is None


@pytest.mark.parametrize("body, fragment", [(b"  ", None), (b"{}", None), (b"[]", "got an array"), (b"1", "got a number"), (b"null", "got null")])
def test_parse_body(body: bytes, fragment: str | None) -> None:
    if fragment is None:
        assert endpoint.parse_body(body) == {}
    else:
        with pytest.raises(ValueError, match=fragment):
            endpoint.parse_body(body)


def test_bodies_in_every_json_encoding_parse_the_same() -> None:
    """The usual body ("{" then no NUL) skips json.detect_encoding; UTF-8 with a BOM, UTF-16 and
    UTF-32 (what json.loads accepts) still parse, and empty ones are {}."""
    text = '{"name": "Zoë", "n": 1}'
    want = {"name": "Zoë", "n": 1}
    for enc in ("utf-8", "utf-8-sig", "utf-16-le", "utf-16-be", "utf-16", "utf-32-le", "utf-32"):
        assert endpoint.parse_body(text.encode(enc)) == want, enc
    assert endpoint.parse_body(b"") == {} and endpoint.parse_body(b" \n") == {}
    with pytest.raises(ValueError, match="not valid JSON"):
        endpoint.parse_body(b"{")
