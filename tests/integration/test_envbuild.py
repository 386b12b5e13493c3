"""Code envs built from a definition, through the real daemon (issue 20).

The tests build two tiny wheels of one package, ``verpkg`` 1.0 and 2.0, into
a local wheelhouse (tests/support/wheels.py: the standard library only, no
network), and pools whose ``code_env`` names one version each. They show:
both versions serving side by side (endpoints and shipped functions); a
restart reusing both envs (the builds are counted in the log); a package that
does not exist failing its own pool only; a build in progress in the status,
the 503s, readiness and systemd's STATUS, and killed by a shutdown; a reload
moving a pool from 1.0 to 2.0 under load without a failed request; and the
``cruised env`` commands.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cruised.client import errors
from cruised.core import envbuild
from support.daemon import Daemon, pool_config, wait_for
from support.httphelp import call, error_of, get, unix, write
from support.load import Tally, http_loop
from support.notify import NotifyListener
from support.wheels import HeldIndex, builder_processes, wheelhouse

pytestmark = pytest.mark.skipif(envbuild.find_uv() is None, reason="uv is not installed (the test extra has it): these tests build with it")

MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"
NOSUCH = "nosuchpkg-cruised-test"

CODE = """
import sys

import verpkg  # only in the pool's code env


def ver():
    return {"verpkg": verpkg.__version__, "prefix": sys.prefix}
"""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


def reqs(wheels: Path, requirement: str) -> list[str]:
    return ["--no-index", f"--find-links {wheels}", requirement]


def env_pool(wheels: Path, requirement: str, **kw: Any) -> dict[str, Any]:
    return pool_config(code_env={"requirements": reqs(wheels, requirement)}, **kw)


def endpoints(code: str, *pools: str) -> dict[str, Any]:
    return {"s": {"endpoints": {p: {"code": code, "function": "ver", "pool": p} for p in pools}}}


def builds(d: Daemon) -> list[str]:
    """Keys this daemon built (one log line per finished build)."""
    return re.findall(r"cruised\.envbuild: code env (\S+) built by", d.log())


def pools_ready(d: Daemon, *names: str) -> bool:
    st = d.status()["pools"]
    return all(st[n]["ready"] for n in names)


def shipped_version(d: Daemon, pool: str) -> tuple[str, str]:
    def where() -> tuple[str, str]:
        import sys

        import verpkg  # type: ignore[import-not-found]  # only in the pool's env

        return verpkg.__version__, sys.prefix

    with d.session(pool=pool) as s:
        return s.call(where)  # type: ignore[no-any-return]


def test_two_versions_serve_side_by_side_and_a_restart_reuses_both(start_daemon: Callable[..., Daemon], tmp_path: Path, wheels: Path) -> None:
    env_dir = tmp_path / "envs"
    code = write(tmp_path / "ver.py", CODE)
    v2: dict[str, Any] = {"requirements": reqs(wheels, "verpkg==2.0")}
    if shutil.which(f"python{MINOR}"):
        v2["python"] = MINOR  # a version, found on PATH
    cfg = {
        "daemon": {"env_dir": str(env_dir)},
        "pools": {
            "default": pool_config(),
            "v1": env_pool(wheels, "verpkg==1.0"),
            "v1b": env_pool(wheels, "verpkg==1.0"),  # the same definition: the same env, built once
            "v2": pool_config(code_env=v2),
            "broken": env_pool(wheels, f"{NOSUCH}==1.0"),
        },
        "services": endpoints(code, "v1", "v1b", "v2", "broken"),
    }
    d = start_daemon(cfg, wait_ready=False)
    wait_for(lambda: pools_ready(d, "default", "v1", "v1b", "v2"), 120, 0.05, "the code env pools")
    t = unix(d)
    answers = {p: call(t, f"s/{p}").json()["response"] for p in ("v1", "v1b", "v2")}
    assert [answers[p]["verpkg"] for p in ("v1", "v1b", "v2")] == ["1.0", "1.0", "2.0"]
    assert all(a["prefix"].startswith(str(env_dir)) for a in answers.values())
    assert answers["v1"]["prefix"] == answers["v1b"]["prefix"] != answers["v2"]["prefix"]
    assert shipped_version(d, "v1") == ("1.0", answers["v1"]["prefix"])
    assert shipped_version(d, "v2") == ("2.0", answers["v2"]["prefix"])
    st = d.status()["pools"]
    keys = {p: st[p]["env"]["key"] for p in ("v1", "v1b", "v2")}
    assert keys["v1"] == keys["v1b"] != keys["v2"]
    assert st["v1"]["env"]["builder"] == "uv" and st["v1"]["env"]["state"] == "ready"
    assert st["default"]["env"] is None

    # the package that does not exist fails its own pool only, with the builder's error
    wait_for(lambda: d.status()["pools"]["broken"]["last_error"], 60, 0.05, "the broken pool's error")
    broken = d.status()["pools"]["broken"]
    assert broken["env"]["state"] == "failed"
    assert broken["last_error"].startswith("code env build failed: uv pip install failed (exit code 1): error: No solution found")
    assert NOSUCH in broken["last_error"]
    resp = call(t, "s/broken")
    assert resp.status == 503 and "retry-after" in resp.headers
    err = error_of(resp)
    assert err["errorType"] == "PoolUnavailable" and "code env build failed" in err["message"] and NOSUCH in err["message"]
    assert get(t, "/readyz").status == 200  # a code env pool is not required by default: the daemon is ready without it
    out = d.cli("status")
    assert "code env build failed" in out.stdout and f"code env {keys['v1']}: ready, built in" in out.stdout
    assert sorted(builds(d)) == sorted({keys["v1"], keys["v2"]})  # v1b waited for v1's build
    assert f"{NOSUCH}" in d.log() and d.log().count("pool=broken code env build failed") == 1

    # a restart builds nothing: every env is found and reused
    d.stop()
    d2 = start_daemon(cfg, wait_ready=False)
    t0 = time.monotonic()
    wait_for(lambda: pools_ready(d2, "default", "v1", "v1b", "v2"), 120, 0.05, "the code env pools after the restart")
    elapsed = time.monotonic() - t0
    assert builds(d2) == []
    assert sorted(re.findall(r"pool=(\S+) code env \S+ reused", d2.log())) == ["v1", "v1b", "v2"]
    st2 = d2.status()["pools"]
    assert {p: st2[p]["env"]["path"] for p in keys} == {p: st[p]["env"]["path"] for p in keys}
    assert all(st2[p]["env"]["reused"] for p in keys)
    assert call(unix(d2), "s/v2").json()["response"]["verpkg"] == "2.0"
    # the failed build is retried once by the new daemon (as by a reload), never in a loop
    wait_for(lambda: d2.status()["pools"]["broken"]["last_error"], 60, 0.05, "the broken pool's error")
    assert d2.log().count("pool=broken code env build failed") == 1
    print(f"restart: code env pools ready {elapsed:.2f}s after start, nothing built")


def test_a_build_in_progress_is_shown_refused_and_killed_by_shutdown(
    start_daemon: Callable[..., Daemon], tmp_path: Path, wheels: Path, short_dir: Path
) -> None:
    env_dir = tmp_path / "envs"
    code = write(tmp_path / "ver.py", CODE)
    listener = NotifyListener(str(short_dir / "notify"))
    with HeldIndex(wheels) as index, HeldIndex(wheels) as never:
        cfg = {
            "daemon": {"env_dir": str(env_dir)},
            "pools": {
                "default": pool_config(),
                "slow": pool_config(queue_timeout="1s", code_env={"requirements": [f"--index-url {index.url}", "verpkg==1.0"]}),
                # required: readiness waits for its build, which never ends (its index never answers)
                "gate": pool_config(required=True, code_env={"requirements": [f"--index-url {never.url}", "verpkg==2.0"]}),
            },
            "services": endpoints(code, "slow", "gate"),
        }
        # uv's own HTTP timeout must not end the held builds before the test does
        d = start_daemon(cfg, wait_ready=False, env={"NOTIFY_SOCKET": str(short_dir / "notify"), "UV_HTTP_TIMEOUT": "600"})
        try:

            def building(pool: str) -> dict[str, Any] | None:
                env = d.status()["pools"][pool]["env"]
                return env if env["state"] == "building" and env["last_line"] else None

            wait_for(lambda: pools_ready(d, "default") and building("slow") and building("gate") and index.requests and never.requests, 60, 0.05, "held builds")
            slow = building("slow")
            assert slow is not None and slow["key"] and slow["elapsed_s"] > 0
            out = d.cli("status")
            assert re.search(r"code env py\S+: building env \d+s: ", out.stdout), out.stdout
            # its endpoint answers 503 at once, saying why; the other pools serve
            resp = call(unix(d), "s/slow")
            assert resp.status == 503 and "retry-after" in resp.headers
            msg = error_of(resp)["message"]
            assert error_of(resp)["errorType"] == "PoolUnavailable" and "building env (" in msg, msg
            with d.session() as s:
                assert s.call(lambda: 42) == 42
            # a shipped function waits in the queue (bounded by queue_timeout), and its timeout says why
            with d.session(pool="slow") as s, pytest.raises(errors.QueueTimeout, match="building env"):
                s.call(lambda: 1)
            # readiness waits for the required pool only; systemd hears about both builds
            ready = get(unix(d), "/readyz")
            assert ready.status == 503
            reasons = json.dumps(ready.json())
            assert "pool gate: 0/1 warm workers: building env (" in reasons and "pool slow" not in reasons and "s/slow" not in reasons
            wait_for(lambda: any("pool slow building env" in m and "pool gate building env" in m for m in listener.snapshot()), 30, 0.05, "STATUS=")
            assert not any("READY=1" in m for m in listener.snapshot())

            # the index answers: the build finishes, the pool starts and serves
            index.release()
            wait_for(lambda: pools_ready(d, "slow"), 60, 0.05, "the slow pool")
            assert call(unix(d), "s/slow").json()["response"]["verpkg"] == "1.0"
            assert get(unix(d), "/readyz").status == 503  # gate is still building

            # a shutdown kills the build still running, and leaves no half-built env
            assert builder_processes(str(env_dir))
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.wait_exit(30) == 0
            assert time.monotonic() - t0 < 20
            wait_for(lambda: not builder_processes(str(env_dir)), 10, 0.05, "the builder to be gone")
            gate_key = d.log().split("pool=gate code env ", 1)[1].split()[0]
            assert list(env_dir.glob(f"{gate_key}.build-*")) == [] and not (env_dir / gate_key).exists()
        finally:
            listener.close()


def set_config(d: Daemon, cfg: dict[str, Any]) -> None:
    tmp = d.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(d.config_path)


def test_reload_moves_a_pool_from_1_0_to_2_0_under_load(start_daemon: Callable[..., Daemon], tmp_path: Path, wheels: Path) -> None:
    env_dir = tmp_path / "envs"
    code = write(tmp_path / "ver.py", CODE)

    def config(requirement: str) -> dict[str, Any]:
        pool = env_pool(wheels, requirement, required=True, min=1, cruise=2, max=4, queue_size=64)
        return {"daemon": {"env_dir": str(env_dir)}, "pools": {"ver": pool}, "services": endpoints(code, "ver")}

    d = start_daemon(config("verpkg==1.0"))
    target = unix(d)
    stop = threading.Event()
    tally = Tally()
    record, answers = tally.record, tally.answers

    def http_client() -> None:
        http_loop(target, "/public/api/v1/s/ver/run", b"{}", stop, tally, lambda response: str(response["verpkg"]))

    def native_client() -> None:
        def version() -> str:
            import verpkg  # type: ignore[import-not-found]  # only in the pool's env

            return str(verpkg.__version__)

        with d.session(pool="ver") as s:
            for _ in range(20_000):  # bounded; normally ended by `stop`
                if stop.is_set():
                    break
                try:
                    record(True, "shipped " + s.call(version))
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    record(False, f"shipped: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=http_client) for _ in range(3)] + [threading.Thread(target=native_client)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: tally.ok > 50, 30, 0.01, "load to be running")
        # a definition that cannot be built: the reload fails, 1.0 keeps serving
        set_config(d, config(f"{NOSUCH}==1.0"))
        out = d.cli("reload", timeout=300)
        assert out.returncode == 1
        assert "generation 1 keeps serving" in out.stderr and "code env build failed" in out.stderr and NOSUCH in out.stderr, out.stderr
        # the move: 2.0 is built while 1.0 serves, then the new generation takes over
        set_config(d, config("verpkg==2.0"))
        before = len(answers)
        out = d.cli("reload", timeout=300)
        assert out.returncode == 0, out.stderr
        assert "generation 2 serving" in out.stdout  # a failed reload uses no number
        swapped = len(answers)
        wait_for(lambda: len(answers) > swapped + 100 and "shipped 2.0" in answers[swapped:], 30, 0.01, "answers from the new env")
        # an unchanged definition is not built again
        out = d.cli("reload", timeout=300)
        assert out.returncode == 0, out.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert tally.failed == 0, tally.failures
    assert {"1.0", "shipped 1.0"} <= set(answers[:before])
    # once generation 2 served, only 2.0 answered (a call admitted by the old generation may finish there)
    assert {"2.0", "shipped 2.0"} <= set(answers[swapped:])
    assert set(answers[swapped + 50 :]) <= {"2.0", "shipped 2.0"}
    assert call(target, "s/ver").json()["response"]["verpkg"] == "2.0"
    assert len(builds(d)) == 2  # 1.0 at start, 2.0 by the reload; the failed one and the unchanged one built nothing


def cruised(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cruised", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_env_commands_build_list_and_prune(tmp_path: Path, wheels: Path) -> None:
    env_dir = tmp_path / "envs"
    cfg = {
        "daemon": {"env_dir": "envs"},  # relative to the config file
        "pools": {"a": env_pool(wheels, "verpkg==1.0"), "a2": env_pool(wheels, "verpkg==1.0"), "b": env_pool(wheels, "verpkg==2.0"), "plain": pool_config()},
    }
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    # two builds at once of the same envs (two deploy steps, say): each env is built once
    procs = [
        subprocess.Popen([sys.executable, "-m", "cruised", "env", "build", "--config", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    built = [{k for _, k in re.findall(r"pool (\S+): code env (\S+) built by uv in", out)} for out, _ in outs]
    reused = [re.findall(r"pool (\S+): code env (\S+) reused", out) for out, _ in outs]
    assert not built[0] & built[1] and len(built[0] | built[1]) == 2, outs  # each env built by one process only
    assert sum(len(r) for r in reused) >= 3  # the other process found all three pools' envs built
    stdout = outs[0][0] + outs[1][0]
    assert "[py" in stdout  # the builder's output, tagged with the env's key
    # list: size, age, builder, and which pools use each
    listing = cruised("env", "list", "--config", str(conf), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    lines = {ln.split()[0]: ln for ln in listing.stdout.splitlines() if ln.startswith("py")}
    assert len(lines) == 2
    assert any(ln.endswith(" a, a2") and " uv " in ln and "KiB" in ln for ln in lines.values()), listing.stdout
    assert any(ln.endswith(" b") for ln in lines.values()), listing.stdout
    data = json.loads(cruised("env", "list", "--json", "--config", str(conf), cwd=tmp_path).stdout)
    assert {tuple(e["pools"]) for e in data["envs"]} == {("a", "a2"), ("b",)} and data["env_dir"] == str(env_dir)
    # the env of b is no longer used once b is gone from the config
    (b_key,) = [e["key"] for e in data["envs"] if e["pools"] == ["b"]]
    del cfg["pools"]["b"]
    conf.write_text(yaml.safe_dump(cfg))
    dry = cruised("env", "prune", "--dry-run", "--config", str(conf), cwd=tmp_path)
    assert dry.returncode == 0 and f"would remove {b_key}" in dry.stdout and (env_dir / b_key).exists()
    pruned = cruised("env", "prune", "--config", str(conf), cwd=tmp_path)
    assert pruned.returncode == 0 and f"removed {b_key}" in pruned.stdout
    assert not (env_dir / b_key).exists() and not list(env_dir.glob(f"{b_key}*"))
    assert len(json.loads(cruised("env", "list", "--json", "--config", str(conf), cwd=tmp_path).stdout)["envs"]) == 1
    # usage errors and a failed build
    assert cruised("env", "build", "--config", str(conf), "nope", cwd=tmp_path).returncode == 2
    assert cruised("env", "build", "--config", str(conf), "plain", cwd=tmp_path).returncode == 2
    cfg["pools"]["bad"] = env_pool(wheels, f"{NOSUCH}==1.0")
    conf.write_text(yaml.safe_dump(cfg))
    bad = cruised("env", "build", "--config", str(conf), "bad", cwd=tmp_path)
    assert bad.returncode == 1 and "pool bad: code env build failed: uv pip install failed" in bad.stderr and NOSUCH in bad.stderr
    # the default config: ./config.yaml
    assert "a, a2" in cruised("env", "list", cwd=tmp_path).stdout
