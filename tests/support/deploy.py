"""The deployment artefacts under deploy/ as tests read them: the Containerfile, the shipped configs.

Nothing here runs a container engine or a cluster (none exists on these
machines): the Containerfile is parsed into its instructions, and a shipped
config is turned into one a test can serve on this host (``local_config``:
its absolute paths moved under a temp dir, its TCP doors onto loopback).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
CONTAINER_CONFIG = DEPLOY / "container" / "config.yaml"
K8S = DEPLOY / "k8s"


class Instruction(NamedTuple):
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str  # the rest of the logical line, continuations joined
    stage: int  # 0 for the first FROM's stage, 1 for the next...


def containerfile(path: Path = CONTAINERFILE) -> list[Instruction]:
    """The instructions of a Containerfile/Dockerfile: comments dropped, ``\\`` continuations joined."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    assert not pending, f"{path}: ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD in exec (JSON) form; the shell form is refused (it would put a shell at PID 1)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not the exec form: {args}"
    return value


def env_pairs(args: str) -> dict[str, str]:
    """``ENV a=1 b=2`` (the key=value form) as a dict."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"ENV in the legacy 'key value' form: {args}"
        pairs[key] = value
    return pairs


def tool(name: str) -> str | None:
    """A command-line tool on PATH, or beside this interpreter (.ci/run may pip-install one into the venv)."""
    import os
    import shutil
    import sys

    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def local_config(text: str, paths: dict[str, str]) -> dict[str, Any]:
    """A shipped config, servable here: each absolute path prefix in ``paths`` replaced (``/etc/cruised``
    -> a temp dir), every TCP door moved to 127.0.0.1 on a free port (tests never listen beyond loopback)."""
    for old, new in paths.items():
        text = text.replace(old, new)
    config: dict[str, Any] = yaml.safe_load(text)
    for door in ("http", "qipc"):
        section = config.get(door) or {}
        if section.get("listen"):
            section["listen"] = "127.0.0.1:0"
    return config


def pod_config(into: Path) -> dict[str, Any]:
    """The ConfigMap's config (deploy/k8s/base/config.yaml), servable here: the q users file (a
    Secret in the pod) a stand-in under ``into``, the doors on loopback (``local_config``)."""
    text = (K8S / "base" / "config.yaml").read_text()
    users_dir = str(Path(yaml.safe_load(text)["qipc"]["users_file"]).parent)
    (into / "qusers").mkdir()
    (into / "qusers" / "qusers").write_text("gw:secret\n")
    return local_config(text, {users_dir: str(into / "qusers")})


# -- the container's process model, emulated: a new PID namespace, a non-root user ----------------

#: cruised as PID 1 of a new PID namespace, as a container runtime starts its entrypoint
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def unshare_unavailable() -> str | None:
    """Why a new PID namespace cannot be made here (a skip reason), or None."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run: {exc}"
    if probe.returncode != 0:
        return f"a new PID namespace is not permitted here (unshare: {probe.stderr.strip()})"
    return None


def namespace_init(outer: int) -> int:
    """The host pid of a namespace's PID 1: the child that ``unshare --fork`` (host pid ``outer``) started."""
    import os

    from support.daemon import wait_for

    def child() -> int | None:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if f"\nPPid:\t{outer}\n" in status:
                    return int(entry)
        return None

    return int(wait_for(child, what="unshare's child"))
