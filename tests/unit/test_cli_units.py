"""The ``cruised`` command line: global options on either side of every command's name."""

from __future__ import annotations

import argparse

import pytest

from cruised import __version__
from cruised.cli.main import build_parser

#: each command with the arguments it requires: every command the parser has must be here
REQUIRED = {
    "serve": [],
    "status": [],
    "metrics": [],
    "check-config": ["config.yaml"],
    "call": ["svc/ep"],
    "test": [],
    "reload": [],
    "drain": [],
    "ready": [],
    "env": ["list"],  # and its other subcommands: global options reach nested commands too
}


def commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # argparse keeps them private
    return set(sub.choices)


def test_every_command_is_covered() -> None:
    assert commands(build_parser()) == set(REQUIRED)


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_socket_before_or_after_the_command(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRUISED_SOCKET", raising=False)
    parser = build_parser()
    rest = REQUIRED[command]
    assert parser.parse_args(["--socket", "/tmp/before.sock", command, *rest]).socket == "/tmp/before.sock"
    assert parser.parse_args([command, *rest, "--socket", "/tmp/after.sock"]).socket == "/tmp/after.sock"
    assert parser.parse_args([command, "--socket", "/tmp/after.sock", *rest]).socket == "/tmp/after.sock"
    assert parser.parse_args([command, *rest]).socket is None, "no flag, no environment: the config or runtime dir decides"
    # on both sides, the one after the command's name wins (it is read last)
    assert parser.parse_args(["--socket", "/tmp/a.sock", command, *rest, "--socket", "/tmp/b.sock"]).socket == "/tmp/b.sock"


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_the_environment_is_the_fallback_on_either_side(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUISED_SOCKET", "/tmp/env.sock")
    parser = build_parser()
    rest = REQUIRED[command]
    assert parser.parse_args([command, *rest]).socket == "/tmp/env.sock"
    assert parser.parse_args(["--socket", "/tmp/before.sock", command, *rest]).socket == "/tmp/before.sock"
    assert parser.parse_args([command, *rest, "--socket", "/tmp/after.sock"]).socket == "/tmp/after.sock"


@pytest.mark.parametrize("where", ["before", "after"])
def test_version_before_or_after_the_command(where: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--version", "status"] if where == "before" else ["status", "--version"]
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"cruised {__version__}"


def test_command_options_stay_with_their_command() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--json", "status"])  # --json belongs to status, not to cruised
    assert parser.parse_args(["status", "--json", "--socket", "/tmp/s.sock"]).json is True
