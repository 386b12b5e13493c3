"""The remote native door through the real daemon: mutual TLS 1.3, the allow-list, reloads, revocation.

Certificates come from trustme (tests/support/certs.py). The happy path runs
everything a local session does over TLS (shipping, libraries, a 64 MB
array, a remote traceback, map); the refusals cover every way in that is
not an allowed, valid client certificate, and a sentinel pickle proves that
a refused peer's frames never reach a worker.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cruised
from cruised.client import shipping
from cruised.pool.wire import bundle, frames
from cruised.pool.wire.frames import Kind, Status
from support.certs import Pki
from support.daemon import Daemon, pool_config, wait_for
from support.raw import read_frame


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def remote_config(pki: Pki, allowed: list[str], crl: bool = False, **pool: Any) -> dict[str, Any]:
    return {
        "pools": {"default": pool_config(max=2, cruise=2, min=1, **pool)},
        "daemon": {"max_message_bytes": "256MiB"},
        "remote": {**pki.remote_section("127.0.0.1:0", allowed, crl=crl), "handshake_timeout": "1s"},
    }


def remote_port(d: Daemon) -> int:
    return int(d.status()["remote"]["port"])


@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    workdir = tmp_path_factory.mktemp("remote")
    d = Daemon(remote_config(pki, ["alice", "bob.team.example"]), workdir).start()
    try:
        yield d, remote_port(d)
    finally:
        d.cleanup_or_fail()


def remote_session(pki: Pki, port: int, name: str = "alice", **kw: Any) -> cruised.Session:
    return cruised.session(host="127.0.0.1", port=port, tls=pki.client(name).tls(pki.ca_file), **kw)


def remote_boom(x: int) -> int:
    raise ValueError(f"remote bad x: {x}")


# -- what a local session does, remotely ------------------------------------------------------------


def test_call_libraries_large_array_error_and_map(pki: Pki, served: tuple[Daemon, int]) -> None:
    d, port = served
    with remote_session(pki, port) as s:

        @cruised.function(s)
        def add(a: int, b: int = 1) -> int:
            return a + b

        assert add(41) == 42
        s.add_library("numpy")

        def total(arr: Any) -> tuple[float, int, str]:
            return float(numpy.sum(arr)), int(arr.nbytes), type(arr).__module__  # type: ignore[name-defined]  # noqa: F821 - imported by add_library in the worker

        big = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
        assert big.nbytes == 64 << 20
        assert s.call(total, big) == (float(big.sum()), 64 << 20, "numpy")
        echoed = s.call(lambda a: a, big)  # 64 MiB back as well
        assert np.array_equal(echoed, big)

        with pytest.raises(ValueError, match="remote bad x: 7") as info:
            s.call(remote_boom, 7)
        assert "remote_boom" in str(info.value.__cause__)  # the worker's traceback text

        assert list(s.map(lambda x: x * x, range(2000))) == [x * x for x in range(2000)]
        fut = s.submit(add, 1, b=2)
        assert fut.result(timeout=30) == 3
        assert s.status()["remote"]["callers"] == ["alice"]
        shown = d.cli("status")
        assert shown.returncode == 0, shown.stderr
        assert "remote door on 127.0.0.1:" in shown.stdout and "(alice)" in shown.stdout
        assert "allowed clients: alice, bob.team.example" in shown.stdout
    log = d.log()
    assert "remote: alice connected from 127.0.0.1:" in log and "CN=alice" in log
    assert "peer=tls:alice@127.0.0.1:" in log  # the access log names the caller


def test_san_identity_and_environment_address(pki: Pki, served: tuple[Daemon, int], monkeypatch: pytest.MonkeyPatch) -> None:
    _, port = served
    bob = pki.client("bob-laptop", san="bob.team.example")  # allowed by its DNS SAN, not its CN
    monkeypatch.setenv("CRUISED_ADDRESS", f"tls://127.0.0.1:{port}")
    monkeypatch.setenv("CRUISED_TLS_CERT", bob.cert_file)
    monkeypatch.setenv("CRUISED_TLS_KEY", bob.key_file)
    monkeypatch.setenv("CRUISED_TLS_CA", pki.ca_file)
    with cruised.session() as s:
        assert s.path == f"tls://127.0.0.1:{port}"
        assert s.call(os.getpid) > 0
        assert "bob.team.example" in s.status()["remote"]["callers"]
    monkeypatch.delenv("CRUISED_TLS_KEY")
    with pytest.raises(ValueError, match="CRUISED_TLS_KEY"):
        cruised.session().ping()


def test_local_operations_and_file_passing_are_refused_remotely(pki: Pki, served: tuple[Daemon, int]) -> None:
    _, port = served
    with remote_session(pki, port) as s:
        with pytest.raises(cruised.CruisedError, match="local operation"):
            s.reload()
        with pytest.raises(cruised.CruisedError, match="local operation"):
            s.drain(True)
        status, frame = s._request(Kind.PASS_FDS, [])
        assert status == Status.BAD_REQUEST and b"cannot cross" in frame
        assert s.call(lambda: 5) == 5  # the connection still serves


# -- refusals --------------------------------------------------------------------------------------


def _handshake_refused(pki: Pki, port: int, ctx: ssl.SSLContext, send: bytes = b"") -> str:
    """Connect with ``ctx``; the error that ends it (in the handshake, or at the first read in TLS 1.3)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            if send:
                tls.sendall(send)
            data = tls.recv(100)
            return f"closed with {data!r}"
    except (ssl.SSLError, OSError) as exc:
        return str(exc)


def test_no_certificate_other_ca_expired_and_tls12_are_refused_in_the_handshake(pki: Pki, served: tuple[Daemon, int]) -> None:
    d, port = served
    import trustme

    before = d.status()["remote"]["refused"]["handshake"]
    assert "CERTIFICATE_REQUIRED" in _handshake_refused(pki, port, pki.raw_context(None)).upper()
    other = pki.client("alice", ca=trustme.CA())  # the allowed name, from a CA the daemon does not trust
    assert "UNKNOWN_CA" in _handshake_refused(pki, port, pki.raw_context(other)).upper()
    expired = pki.client("alice", expired=True)
    assert "EXPIRED" in _handshake_refused(pki, port, pki.raw_context(expired)).upper()
    tls12 = pki.raw_context(pki.client("alice"), maximum=ssl.TLSVersion.TLSv1_2)
    assert "VERSION" in _handshake_refused(pki, port, tls12).upper()
    # cruised's own client says what happened
    with pytest.raises(cruised.DaemonUnavailable, match="does not trust the CA"):
        cruised.session(host="127.0.0.1", port=port, tls=other.tls(pki.ca_file)).call(os.getpid)
    with pytest.raises(cruised.DaemonUnavailable, match="expired"):
        cruised.session(host="127.0.0.1", port=port, tls=expired.tls(pki.ca_file)).call(os.getpid)
    wait_for(lambda: d.status()["remote"]["refused"]["handshake"] >= before + 6, 10, what="handshake refusals counted")
    assert "refused 127.0.0.1:" in d.log() and "in the TLS handshake" in d.log()


def test_garbage_before_the_handshake_is_refused(pki: Pki, served: tuple[Daemon, int]) -> None:
    d, port = served
    before = d.status()["remote"]["refused"]["handshake"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        # a native frame in plaintext, as a client that forgot TLS would send
        raw.sendall(frames.frame(Kind.PING, 1) + b"GET / HTTP/1.1\r\n\r\n" * 10)
        raw.settimeout(10)
        try:
            while raw.recv(4096):  # an alert, maybe, then the end
                pass
        except OSError:
            pass
    wait_for(lambda: d.status()["remote"]["refused"]["handshake"] > before, 10, what="the garbage counted as a refused handshake")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:  # connects, never says a word
        t0 = time.monotonic()
        assert silent.recv(100) == b""  # closed by the daemon after remote.handshake_timeout (1 s here)
        assert time.monotonic() - t0 < 8
    assert "no complete handshake within 1s (remote.handshake_timeout)" in d.log()
    with remote_session(pki, port) as s:
        assert s.call(lambda: "still serving") == "still serving"


SENTINEL_NAME = "sentinel-ran"


class Sentinel:
    """Unpickling this anywhere creates the marker file: proof that bytes reached an unpickler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _sentinel_frames(marker: str) -> bytes:
    """REGISTER whose code blob is the sentinel, then a CALL of it whose argument is one too."""
    blob = pickle.dumps(Sentinel(marker))
    key = shipping.function_key(blob, {})
    meta = json.dumps({"python": shipping.PYTHON, "libraries": {}, "name": "sentinel"}).encode()
    register = frames.register_head("default", key, meta) + blob
    parts = bundle.pack(((Sentinel(marker),), {}))
    call = frames.call_head("default", 0, key) + b"".join(bytes(p) for p in parts)
    return frames.frame(Kind.REGISTER, 1, register) + frames.frame(Kind.CALL, 2, call)


def test_a_refused_peers_sentinel_never_reaches_a_worker(pki: Pki, served: tuple[Daemon, int], tmp_path: Path) -> None:
    d, port = served
    marker = tmp_path / SENTINEL_NAME
    payload = _sentinel_frames(str(marker))
    mallory = pki.client("mallory")  # a valid certificate of the right CA, a name not in allowed_clients
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with pki.raw_context(mallory).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(payload)  # at once, pipelined behind the handshake: before the refusal can arrive
        kind, status, reqid, body = read_frame(tls)  # type: ignore[arg-type]  # an SSLSocket reads like a socket
        assert (kind, status, reqid) == (Kind.REPLY, Status.ACCESS_DENIED, 0)
        assert "not allowed" in json.loads(body)["message"]
    assert "not in remote.allowed_clients" in wait_for(lambda: d.log() if "mallory" in d.log() else None, 10, what="the refusal logged")
    with remote_session(pki, port) as s:
        s.call(lambda: None)  # a round trip through the pool after the refused bytes
    assert not marker.exists()
    # the control: the same bytes from an allowed peer do reach a worker's unpickler
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with pki.raw_context(pki.client("alice")).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(payload)
        for _ in range(2):
            read_frame(tls)  # type: ignore[arg-type]  # an SSLSocket reads like a socket
    wait_for(marker.exists, 10, what="the allowed peer's sentinel to run (the control)")


# -- reload and revocation --------------------------------------------------------------------------


def _server_serial(pki: Pki, port: int) -> int:
    from cryptography import x509

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with pki.raw_context(pki.client("alice")).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_sighup_serves_new_certificates_and_a_new_crl(tmp_path: Path) -> None:
    import signal

    pki = Pki(tmp_path / "pki")  # its own: this test rewrites the files
    carol = pki.client("carol")
    d = Daemon(remote_config(pki, ["alice", "carol"], crl=True), tmp_path).start()
    try:
        port = remote_port(d)
        first = _server_serial(pki, port)
        with cruised.session(host="127.0.0.1", port=port, tls=carol.tls(pki.ca_file)) as s:
            assert s.call(lambda: 1) == 1
            second = pki.issue_server(organization="cruised daemon, renewed")
            pki.revoke(carol)
            d.signal(signal.SIGHUP)
            wait_for(lambda: "remote door: certificates reloaded" in d.log(), 60, 0.05, "the reload")
            assert s.call(lambda: 2) == 2  # an open connection keeps its session
        assert first != second
        assert _server_serial(pki, port) == second  # new connections: the new certificate
        with pytest.raises(cruised.DaemonUnavailable, match="revoked"):
            cruised.session(host="127.0.0.1", port=port, tls=carol.tls(pki.ca_file)).call(os.getpid)
        with remote_session(pki, port) as s:
            assert s.call(lambda: 3) == 3  # alice is not revoked
    finally:
        d.cleanup_or_fail()


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from cruised import config

    pki = Pki(tmp_path / "pki")
    section = pki.remote_section("127.0.0.1:0", [])
    section["key_file"] = pki.client("alice").key_file  # a key of another certificate
    with pytest.raises(config.ConfigErrors) as info:
        config.parse({"remote": section})
    text = str(info.value)
    assert "remote.allowed_clients: is required" in text
    assert "remote.key_file: cannot use it with cert_file" in text
    with pytest.raises(config.ConfigErrors, match=r"remote\.client_ca_file: is required"):
        config.parse({"remote": {"listen": "127.0.0.1:0", "cert_file": pki.server_cert_file, "key_file": pki.server_key_file, "allowed_clients": ["a"]}})
    with pytest.raises(config.ConfigErrors, match=r"remote\.crl_file: no such file"):
        config.parse({"remote": {**pki.remote_section("127.0.0.1:0", ["a"]), "crl_file": str(tmp_path / "nope.pem")}})


def test_client_says_tls_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="mutual TLS only"):
        cruised.session(host="127.0.0.1", port=1)
    monkeypatch.setenv("CRUISED_ADDRESS", "tcp://h:1")
    with pytest.raises(ValueError, match="tls://host:port"):
        cruised.session().ping()


def _recipe(name: str) -> str:
    """A shell block of docs/scaling.md, marked ``<!-- recipe: name -->``."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text()
    m = re.search(rf"<!-- recipe: {name} -->\n```sh\n(.*?)```", text, re.S)
    assert m, f"docs/scaling.md has no {name} recipe"
    return m.group(1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command (Debian package openssl)")
def test_the_docs_openssl_recipe_makes_certificates_the_daemon_serves_and_revokes(tmp_path: Path) -> None:
    import signal
    import subprocess

    pki = tmp_path / "pki"
    pki.mkdir()
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", _recipe("certificates")], cwd=pki, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    remote = {
        "listen": "127.0.0.1:0",
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server.key"),
        "client_ca_file": str(pki / "ca.pem"),
        "crl_file": str(pki / "crl.pem"),
        "allowed_clients": ["alice"],
    }
    d = Daemon({"pools": {"default": pool_config()}, "remote": remote}, tmp_path).start()
    try:
        port = remote_port(d)
        alice = cruised.TLS(cert_file=str(pki / "alice.pem"), key_file=str(pki / "alice.key"), ca_file=str(pki / "ca.pem"))
        with cruised.session(host="127.0.0.1", port=port, tls=alice) as s:
            assert s.call(lambda: "served") == "served"
        revoked = subprocess.run(["bash", "-euo", "pipefail", "-c", _recipe("revoke")], cwd=pki, capture_output=True, text=True, timeout=120)
        assert revoked.returncode == 0, revoked.stderr
        d.signal(signal.SIGHUP)
        wait_for(lambda: "remote door: certificates reloaded" in d.log(), 60, 0.05, "the reload")
        with pytest.raises(cruised.DaemonUnavailable, match="revoked"):
            cruised.session(host="127.0.0.1", port=port, tls=alice).call(os.getpid)
    finally:
        d.cleanup_or_fail()


def test_a_taken_remote_port_stops_the_start_and_closes_the_doors_opened_before(pki: Pki, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        cfg = {**remote_config(pki, ["alice"]), "http": {"listen": "127.0.0.1:0"}, "health": {"agent": "127.0.0.1:0"}}
        cfg["remote"]["listen"] = f"127.0.0.1:{port}"
        d = Daemon(cfg, tmp_path).start(wait_ready=False)
        try:
            assert d.wait_exit(60) != 0
            assert f"cannot listen on 127.0.0.1:{port} (remote.listen)" in d.log()
            assert not os.path.exists(d.socket)  # the native door, opened first, is gone with it
        finally:
            d.cleanup_or_fail()
    finally:
        taken.close()
