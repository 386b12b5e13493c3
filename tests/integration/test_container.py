"""deploy/container/: the Containerfile's contract, and its install steps replayed without an engine.

No container engine runs on these machines, so the image is checked in two
ways. Its Containerfile is parsed and held to the contract the Kubernetes
manifests rely on (entrypoint, user, stop signal, exposed ports = the config's
doors). Then the image's own steps are replayed on this host: the build
stage's COPY lines make the build context, the project is installed
non-editable into a fresh venv (as ``pip install .`` does there), and that
venv's ``cruised serve`` runs on the image's config as PID 1 of a new PID
namespace, as the image's unprivileged user, with the image's environment;
the probes and the doors must answer. Only the base image and the engine
itself are not exercised.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support import httphelp
from support.daemon import Daemon, wait_for
from support.deploy import (
    CONTAINER_CONFIG,
    ROOT,
    UNSHARE,
    Instruction,
    containerfile,
    env_pairs,
    exec_form,
    listen_port,
    local_config,
    namespace_init,
    unshare_unavailable,
)

ENTRYPOINT = ["cruised", "serve", "--config", "/etc/cruised/config.yaml"]


def stage(instructions: list[Instruction], index: int) -> list[Instruction]:
    return [i for i in instructions if i.stage == index]


def only(instructions: list[Instruction], keyword: str) -> str:
    found = [i.args for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"{keyword}: expected exactly one in the stage, found {found}"
    return found[0]


def image_user(runtime: list[Instruction]) -> tuple[int, int]:
    uid, _, gid = only(runtime, "USER").partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER must be numeric uid:gid (runAsNonRoot checks it without /etc/passwd): {uid}:{gid}"
    return int(uid), int(gid)


def test_the_containerfile_keeps_its_contract() -> None:
    instructions = containerfile()
    final = max(i.stage for i in instructions)
    runtime = stage(instructions, final)
    base = only(runtime, "FROM").split()[0]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), f"a slim Python base, got {base}"

    assert exec_form(only(runtime, "ENTRYPOINT")) == ENTRYPOINT  # exec form: cruised itself is PID 1
    assert not [i for i in runtime if i.keyword == "CMD"], "no CMD: arguments belong to the entrypoint"
    assert only(runtime, "STOPSIGNAL") == "SIGTERM"
    uid, gid = image_user(runtime)
    assert uid != 0 and gid != 0

    # the doors the config opens on the pod network are the ports the image exposes
    config = yaml.safe_load(CONTAINER_CONFIG.read_text())
    doors = [config["http"]["listen"], config["qipc"]["listen"]]
    assert all(d.startswith("0.0.0.0:") for d in doors), f"the doors must listen on the pod network: {doors}"
    exposed = {int(word.split("/")[0]) for word in only(runtime, "EXPOSE").split()}
    assert exposed == {listen_port(d) for d in doors}

    # the config is the one shipped beside this file, where the entrypoint reads it
    copies = [i.args.split() for i in runtime if i.keyword == "COPY"]
    assert ["deploy/container/config.yaml", ENTRYPOINT[-1]] in copies, copies

    # sockets: the runtime dir is set, created for the user, and the config does not override it
    env: dict[str, str] = {}
    for i in runtime:
        if i.keyword == "ENV":
            env.update(env_pairs(i.args))
    rundir = env["RUNTIME_DIRECTORY"]
    assert any(i.keyword == "RUN" and f"-o {uid} -g {gid}" in i.args and rundir in i.args for i in runtime), f"{rundir} must be created for {uid}:{gid}"
    assert "socket" not in (config.get("daemon") or {}), "daemon.socket would move the socket out of RUNTIME_DIRECTORY"

    # installed non-editable into a venv whose bin is first on PATH (the entrypoint resolves there)
    install = [i for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert len(install) == 1 and install[0].stage < final, install
    venv = re.search(r"(\S+)/bin/pip install \.(\s|$)", install[0].args)
    assert venv is not None, f"expected '<venv>/bin/pip install .': {install[0].args}"
    assert "-e" not in install[0].args.split() and "--editable" not in install[0].args
    assert env["PATH"].split(":")[0] == f"{venv.group(1)}/bin"
    assert [f"--from={instructions[0].args.split()[-1]}", venv.group(1), venv.group(1)] in copies, "the runtime stage takes the built venv"


def build_context(instructions: list[Instruction], into: Path) -> Path:
    """What the build stage's COPY lines put under its WORKDIR, copied from this checkout."""
    build = stage(instructions, 0)
    src = into / only(build, "WORKDIR").lstrip("/")
    src.mkdir(parents=True)
    for i in build:
        if i.keyword != "COPY":
            continue
        *sources, dest = i.args.split()
        for name in sources:
            target = src / dest / name if dest.endswith("/") else src / dest
            origin = ROOT / name
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target)
    return src


@pytest.fixture
def image_root() -> Iterator[Path]:
    # world-readable (the image's user must read it); short: the sockets live under it
    d = Path(tempfile.mkdtemp(prefix="crimg", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def interpreter_for_others() -> str | None:
    """A Python of this version that any user may run (every directory on its real path and the file
    itself world-executable), as the image's /usr/local/bin/python is: the venv is built on it."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (getattr(sys, "_base_executable", sys.executable), f"/usr/local/bin/python{version}", f"/usr/bin/python{version}"):
        real = Path(os.path.realpath(candidate))
        if real.is_file() and all(p.stat().st_mode & 0o001 for p in (real, *real.parents)):
            return str(real)
    return None


def whoami() -> tuple[int, str]:
    import cruised

    return os.getuid(), cruised.__file__


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the image's user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
@pytest.mark.skipif(bool(unshare_unavailable()), reason=unshare_unavailable() or "")
def test_the_image_install_serves_as_its_user_as_pid_1(image_root: Path) -> None:
    instructions = containerfile()
    runtime = stage(instructions, max(i.stage for i in instructions))
    uid, gid = image_user(runtime)

    # build: the context from the COPY lines, `pip install .` (non-editable) into a fresh venv.
    # Its dependencies come from this test environment (a .pth), not from the network: what is
    # proven is the project's own packaging, entry point and data, not PyPI's availability.
    src = build_context(instructions, image_root)
    venv = image_root / "venv"
    base = interpreter_for_others()
    if base is None:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} here that a non-root user may run (this one sits in a private directory)")
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    assert (site / "cruised" / "pool" / "template.py").is_file() and not list(site.glob("__editable__*")), "a real copy, not an editable link"
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # runtime: the image's config, users file, runtime dir and home, owned as the image has them
    etc = image_root / "etc"
    (etc / "qusers").mkdir(parents=True)
    (etc / "qusers" / "qusers").write_text("gw:secret\n")
    config = local_config(CONTAINER_CONFIG.read_text(), {"/etc/cruised": str(etc)})
    env: dict[str, str] = {}
    for i in runtime:
        if i.keyword == "ENV":
            env.update(env_pairs(i.args))
    rundir, home = image_root / "run", image_root / "home"
    for d in (rundir, home):
        d.mkdir(mode=0o750)
        os.chown(d, uid, gid)
    env.update({"RUNTIME_DIRECTORY": str(rundir), "HOME": str(home), "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin"})
    work = image_root / "work"
    work.mkdir(mode=0o755)

    entry = exec_form(only(runtime, "ENTRYPOINT"))
    d = Daemon(
        config,
        work,
        env=env,
        prefix=[*UNSHARE, "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"],
        command=[str(venv / "bin" / entry[0])],
    )
    d.env.pop("CRUISED_SOCKET")  # the image sets none: the socket must land in RUNTIME_DIRECTORY
    d.socket = str(rundir / "cruised.sock")
    try:
        d.start()
        assert d.proc is not None
        d.signal_pid = namespace_init(d.proc.pid)
        with d.session() as s:
            got_uid, module = s.call(whoami)
        assert got_uid == uid
        assert module.startswith(str(site)), f"workers must run the installed copy, not the checkout: {module}"

        tcp = httphelp.tcp(d)
        for path in ("/livez", "/healthz", "/readyz"):
            assert httphelp.get(tcp, path).status == 200, path
        metrics = httphelp.get(tcp, "/metrics")
        assert metrics.status == 200 and b"cruised_workers{" in metrics.body
        q = d.status()["qipc"]
        assert q["auth"] and q["port"]
        with socket.create_connection(("127.0.0.1", q["port"]), timeout=10):
            pass

        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=60) == 0, d.log()
        wait_for(lambda: not os.path.exists(d.socket), what="the socket removed at exit")
    finally:
        d.cleanup()
