"""The remote door's pure parts: who a certificate names, addresses, the client's TLS settings."""

from __future__ import annotations

from typing import Any

import pytest

import cruised
from cruised.client import paths
from cruised.doors import mtls

ALICE: dict[str, Any] = {
    "subject": ((("organizationName", "Example"),), (("commonName", "alice"),)),
    "subjectAltName": (("DNS", "alice.desk.example"), ("IP Address", "10.1.2.3"), ("email", "alice@example.com"), ("URI", "spiffe://team/alice")),
}


@pytest.mark.parametrize("name", ["alice", "alice.desk.example", "10.1.2.3", "alice@example.com", "spiffe://team/alice"])
def test_a_certificate_is_allowed_under_its_cn_or_any_san(name: str) -> None:
    assert mtls.peer_identity(ALICE, frozenset({name, "someone-else"})) == name


def test_names_outside_the_list_and_missing_certificates_are_refused() -> None:
    assert mtls.peer_identity(ALICE, frozenset({"bob", "Alice", "Example"})) is None  # exact names; O is not an identity
    assert mtls.peer_identity(None, frozenset({"alice"})) is None
    assert mtls.peer_identity({}, frozenset({"alice"})) is None
    assert mtls.identities(ALICE)[0] == "alice"  # the CN first: the caller's name when both are listed
    assert mtls.subject_text(ALICE) == "O=Example,CN=alice"


def test_addresses() -> None:
    assert paths.parse_address("tls://h1.example.com:7443") == paths.RemoteAddress("h1.example.com", 7443, None)
    assert paths.parse_address("tls://[::1]:7443") == paths.RemoteAddress("::1", 7443, None)
    assert str(paths.RemoteAddress("::1", 7443, None)) == "tls://[::1]:7443"
    assert paths.parse_address("unix:///run/cruised/cruised.sock") == "/run/cruised/cruised.sock"
    assert paths.parse_address("/tmp/c.sock") == "/tmp/c.sock"
    for bad in ("tcp://h:1", "tls://h", "tls://h:0", "tls://:7443", "h:7443"):
        with pytest.raises(ValueError, match="CRUISED_ADDRESS must be"):
            paths.parse_address(bad)


def test_the_environment_names_a_remote_daemon_only_with_all_three_files() -> None:
    env = {"CRUISED_ADDRESS": "tls://lb:7443", "CRUISED_TLS_CERT": "c.pem", "CRUISED_TLS_KEY": "c.key", "CRUISED_TLS_CA": "ca.pem"}
    address = paths.client_address(env)
    assert isinstance(address, paths.RemoteAddress) and address.tls == cruised.TLS("c.pem", "c.key", "ca.pem")
    assert paths.client_address({}) is None
    assert paths.client_address({"CRUISED_ADDRESS": "unix:///x.sock"}) == "/x.sock"
    with pytest.raises(ValueError, match="needs CRUISED_TLS_CERT"):
        paths.client_address({"CRUISED_ADDRESS": "tls://lb:7443"})
    with pytest.raises(ValueError, match="missing CRUISED_TLS_CA"):
        paths.client_address({k: v for k, v in env.items() if k != "CRUISED_TLS_CA"})


def test_session_arguments_say_what_is_missing(tmp_path: Any) -> None:
    tls = cruised.TLS("c.pem", "c.key", "ca.pem")
    with pytest.raises(ValueError, match="not both"):
        cruised.session(socket="/x.sock", host="h", port=1, tls=tls)
    with pytest.raises(ValueError, match="both host= and port="):
        cruised.session(host="h", tls=tls)
    with pytest.raises(ValueError, match="goes with host="):
        cruised.session(tls=tls)
    with pytest.raises(ValueError, match="connections must be a positive integer"):
        cruised.session(connections=0)
    assert cruised.Session(host="h", port=7443, tls=tls, connections=3).path == "tls://h:7443", "Session() is lazy"
    with pytest.raises(FileNotFoundError, match=r"cruised\.TLS cert_file: no such file: c\.pem"):
        tls.context()
    with pytest.raises(FileNotFoundError, match=r"cruised\.TLS cert_file"):
        cruised.session(host="h", port=7443, tls=tls)  # session(host=) connects now, as pykx.remote.session does
