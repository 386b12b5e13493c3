"""The ``cruised`` command against a real daemon on a socket that only ``--socket`` names."""

from __future__ import annotations

from pathlib import Path

from support.daemon import Daemon, pool_config


def test_socket_option_on_either_side_of_the_command(tmp_path: Path) -> None:
    d = Daemon({"pools": {"default": pool_config()}}, tmp_path)
    other = str(d.sockdir / "other.sock")
    # the environment points elsewhere: only the option, given after `serve`, can put it on `other`
    d.env["CRUISED_SOCKET"] = str(d.sockdir / "nothing-here.sock")
    d.socket = other
    d.args = ["--socket", other]
    try:
        d.start()
        for argv in (["status", "--socket", other], ["--socket", other, "status"]):
            out = d.cli(*argv)
            assert out.returncode == 0, (argv, out.stderr)
            assert f"socket {other}" in out.stdout, out.stdout
        out = d.cli("metrics", "--socket", other)
        assert out.returncode == 0 and "cruised_requests" in out.stdout, out.stderr
        # without the option the environment's socket is asked, and nothing answers there
        missing = d.cli("status")
        assert missing.returncode == 1 and "nothing-here.sock" in missing.stderr, missing.stderr
    finally:
        d.cleanup_or_fail()
