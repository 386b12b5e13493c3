"""Code envs built from a definition (daemon/core/envbuild.py): definitions, keys, the cache, builders, config errors.

The builds here run the real builders on a local wheelhouse (no network):
uv where it is installed (the test extra has it), and the venv+pip fallback
once. The daemon's side (status, 503s, readiness, reload) is in
tests/integration/test_envbuild.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cruised import config
from cruised.config import CodeEnvConfig, ConfigErrors
from cruised.core import envbuild
from cruised.core.envbuild import Cache, Definition, Interpreter
from support.wheels import wheelhouse

MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"
HAVE_UV = envbuild.find_uv() is not None


def errors_of(raw: dict[str, Any], base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as exc:
        config.parse(raw, base)
    return [str(e) for e in exc.value.errors]


def env_spec(**kw: Any) -> CodeEnvConfig:
    return CodeEnvConfig(**kw)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheelhouse(tmp_path_factory.mktemp("wheels"))


def daemon_config(env_dir: Path, **kw: Any) -> config.DaemonConfig:
    return config.DaemonConfig(env_dir=str(env_dir), **kw)


# -- requirement lines --------------------------------------------------------------------------


def test_options_are_split_in_every_spelling() -> None:
    assert envbuild.split_option("--find-links /w") == ("--find-links", "/w")
    assert envbuild.split_option("--find-links=/w") == ("--find-links", "/w")
    assert envbuild.split_option("-f /w") == ("-f", "/w")
    assert envbuild.split_option("-f/w") == ("-f", "/w")
    assert envbuild.split_option("--no-index") == ("--no-index", "")
    assert envbuild.split_option("numpy==1.26") is None


def test_logical_lines_join_continuations_and_drop_comments() -> None:
    text = "# a comment\nnumpy==1.26  # pinned\n\npandas \\\n  >=2\n--no-index\n"
    assert envbuild.logical_lines(text) == [(2, "numpy==1.26"), (4, "pandas   >=2"), (6, "--no-index")]


def test_line_problems() -> None:
    assert envbuild.line_problem("numpy") is None
    assert envbuild.line_problem("--index-url https://example.invalid/simple") is None
    assert envbuild.line_problem("") == "is empty"
    assert "unknown option --frobnicate" in (envbuild.line_problem("--frobnicate") or "")
    assert envbuild.line_problem("--find-links") == "option --find-links needs a value"
    assert envbuild.line_problem("--no-index yes") == "option --no-index takes no value, got 'yes'"
    assert "one requirement per list item" in (envbuild.line_problem("a\nb") or "")


def test_relative_paths_are_made_absolute_urls_are_not(tmp_path: Path) -> None:
    lines = ["--find-links wheels", "-f /abs/w", "./pkg", "-e ../src/lib", "--index-url https://example.invalid/simple", "numpy", "-r more.txt"]
    assert envbuild.resolve_paths(lines, str(tmp_path)) == [
        f"--find-links {tmp_path}/wheels",
        "-f /abs/w",
        f"{tmp_path}/pkg",
        f"-e {tmp_path.parent}/src/lib",
        "--index-url https://example.invalid/simple",
        "numpy",
        f"-r {tmp_path}/more.txt",
    ]


def test_a_requirements_file_is_read_with_its_includes_and_constraints(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.txt").write_text("--find-links ../wheels\nverpkg  # the package\n")
    (tmp_path / "constraints.txt").write_text("verpkg<3\n")
    req = tmp_path / "requirements.txt"
    req.write_text("--no-index\n-r sub/more.txt\n-c constraints.txt\n")
    d = envbuild.read_definition(env_spec(requirements_file=str(req)))
    assert d.lines == ("--no-index", f"--find-links {tmp_path}/wheels", "verpkg", f"-c {tmp_path}/constraints.txt")
    assert [path for path, _ in d.files] == [str(tmp_path / "constraints.txt")]
    # a changed constraint file is a changed definition
    (tmp_path / "constraints.txt").write_text("verpkg<2\n")
    assert envbuild.read_definition(env_spec(requirements_file=str(req))).files != d.files


def test_definition_errors_say_where(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n--frobnicate\n")
    err = envbuild.check(env_spec(requirements_file=str(req)))
    assert err is not None and err.where == "requirements_file" and err.message.startswith("line 2: unknown option --frobnicate")
    req.write_text("-r requirements.txt\n")
    err = envbuild.check(env_spec(requirements_file=str(req)))
    assert err is not None and "includes itself" in err.message
    err = envbuild.check(env_spec(requirements=["numpy", "--bogus"]))
    assert err is not None and err.where == "requirements[1]"


# -- config ---------------------------------------------------------------------------------------


def test_code_env_config_resolves_paths_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "req.txt").write_text("numpy\n")
    (tmp_path / "c.yaml").write_text(
        "daemon: {env_dir: envs, env_build_timeout: 2m}\n"
        "pools:\n"
        "  a: {code_env: {requirements: ['--find-links wheels', numpy], python: '3.11'}}\n"
        "  b: {code_env: {requirements_file: req.txt}}\n"
        "  c: {min: 1}\n"
    )
    cfg = config.load(tmp_path / "c.yaml")
    assert cfg.daemon.env_dir == str(tmp_path / "envs") and cfg.daemon.env_build_timeout == 120.0
    a, b = cfg.pools["a"].code_env, cfg.pools["b"].code_env
    assert a is not None and a.requirements == [f"--find-links {tmp_path}/wheels", "numpy"] and a.python == "3.11"
    assert b is not None and b.requirements_file == str(tmp_path / "req.txt") and b.python is None
    assert cfg.pools["c"].code_env is None
    assert [envbuild.required(cfg.pools[p]) for p in "abc"] == [False, False, True]
    assert envbuild.required(config.parse({"pools": {"p": {"required": True, "code_env": {}}}}).pools["p"])


def test_code_env_errors_name_the_key(tmp_path: Path) -> None:
    assert errors_of({"pools": {"x": {"python": "/usr/bin/python3", "code_env": {"requirements": ["numpy"]}}}}) == [
        "pools.x.code_env: give pools.x.python (an interpreter someone built) or pools.x.code_env (a definition cruised builds), not both"
    ]
    assert errors_of({"pools": {"x": {"code_env": {"requirements_file": str(tmp_path / "nope.txt")}}}}) == [
        f"pools.x.code_env.requirements_file: cannot read {tmp_path}/nope.txt: No such file or directory"
    ]
    assert errors_of({"pools": {"x": {"code_env": {"requirements": ["numpy"], "requirements_file": "r.txt"}}}}, tmp_path) == [
        "pools.x.code_env.requirements_file: give requirements or requirements_file, not both"
    ]
    assert errors_of({"pools": {"x": {"code_env": {"requirements": ["numpy", "--frobnicate"]}}}})[0].startswith(
        "pools.x.code_env.requirements[1]: unknown option --frobnicate"
    )
    (line,) = errors_of({"pools": {"x": {"code_env": {"python": 3.10}}}})
    assert line.startswith("pools.x.code_env.python: expected an interpreter path or a version in quotes") and "3.1" in line
    assert errors_of({"pools": {"x": {"code_env": {"python": "no-such-python-here"}}}}) == [
        "pools.x.code_env.python: no command 'no-such-python-here' on PATH (give an interpreter path, or a version such as \"3.11\")"
    ]
    assert errors_of({"daemon": {"env_builder": "conda"}}) == ["daemon.env_builder: must be auto, uv or pip, got 'conda'"]
    (line,) = errors_of({"pools": {"x": {"code_env": {"requirement": ["numpy"]}}}})
    assert line.startswith("pools.x.code_env.requirement: unknown key") and "'requirements'" in line


def test_describe_includes_the_code_env_settings() -> None:
    keys = [k for k, _, _ in config.describe()]
    for key in ("pools.<name>.code_env.requirements", "pools.<name>.code_env.python", "pools.<name>.required", "daemon.env_dir", "daemon.env_build_timeout"):
        assert key in keys


# -- keys ---------------------------------------------------------------------------------------------


def test_the_key_changes_with_what_makes_an_env_stale_and_nothing_else() -> None:
    interp = Interpreter("/usr/bin/python3.11", (3, 11, 2), "cpython", "x86_64")
    d = Definition(("numpy==1.26",), (), None)
    key = envbuild.env_key(interp, d)
    assert envbuild.KEY_RE.match(key) and key.startswith("py3.11-")
    assert envbuild.env_key(interp, Definition(("numpy==1.26",), (), "3.11")) == key  # how the interpreter was named: no
    assert envbuild.env_key(Interpreter("/usr/bin/python3.11", (3, 11, 9), "cpython", "x86_64"), d) == key  # a patch release: no
    assert envbuild.env_key(interp, Definition(("numpy==1.25",), (), None)) != key
    assert envbuild.env_key(interp, Definition(("numpy==1.26",), (("/c.txt", "ab"),), None)) != key
    assert envbuild.env_key(Interpreter("/opt/py/bin/python3.11", (3, 11, 2), "cpython", "x86_64"), d) != key
    assert envbuild.env_key(Interpreter("/usr/bin/python3.12", (3, 12, 0), "cpython", "x86_64"), d).startswith("py3.12-")


async def test_probe_and_version_resolution() -> None:
    deadline = asyncio.get_running_loop().time() + 60
    interp = await envbuild.probe(sys.executable, deadline)
    assert interp.minor == MINOR and os.path.isabs(interp.executable)
    assert interp.executable == os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    assert await envbuild.resolve_interpreter(None, None, deadline) == sys.executable
    assert await envbuild.resolve_interpreter("/x/bin/python", None, deadline) == "/x/bin/python"
    with pytest.raises(envbuild.BuildError, match=r"no python2\.1 on PATH, and no uv"):
        await envbuild.resolve_interpreter("2.1", None, deadline)
    with pytest.raises(envbuild.BuildError, match="no such interpreter"):
        await envbuild.probe("/nonexistent/python", deadline)
    with pytest.raises(envbuild.BuildError, match="is not a working Python interpreter"):
        await envbuild.probe("/bin/false", deadline)


# -- the cache ------------------------------------------------------------------------------------------


def fake_env(cache: Cache, key: str, build: str = "b1", marker: bool = True) -> Path:
    target = cache.root / f"{key}{envbuild.BUILD_INFIX}{build}"
    (target / "bin").mkdir(parents=True)
    os.symlink(sys.executable, target / "bin" / "python")
    if marker:
        (target / envbuild.MARKER).write_text(json.dumps({"key": key, "built_at": 0}))
    return target


KEY_A, KEY_B = "py3.11-" + "a" * 16, "py3.11-" + "b" * 16


def test_lookup_trusts_only_a_published_complete_env(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    half = fake_env(cache, KEY_A, "crashed", marker=False)
    assert cache.lookup(KEY_A) is None  # nothing published
    cache.publish(KEY_A, half)
    assert cache.lookup(KEY_A) is None  # published without its marker (cannot happen, but is not trusted)
    good = fake_env(cache, KEY_A, "good")
    cache.publish(KEY_A, good)
    assert cache.lookup(KEY_A) == good
    assert cache.leftovers(KEY_A, good) == [half]
    cache.remove_stale(KEY_A)
    assert not half.exists() and cache.lookup(KEY_A) == good
    # its base interpreter gone: the env is invalid (and is rebuilt)
    os.unlink(good / "bin" / "python")
    os.symlink(tmp_path / "gone" / "python3", good / "bin" / "python")
    assert cache.lookup(KEY_A) is None


def test_prune_keeps_what_is_used_or_held(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for key in (KEY_A, KEY_B, "py3.11-" + "c" * 16):
        cache.publish(key, fake_env(cache, key))
    fake_env(cache, KEY_A, "crashed", marker=False)
    held = cache.try_lock(KEY_B, exclusive=False)  # a running pool uses B
    assert held is not None
    try:
        removed, busy = cache.prune(keep={KEY_A}, dry_run=True)
        assert busy == [KEY_B] and len(removed) == 2 and cache.lookup("py3.11-" + "c" * 16) is not None
        removed, busy = cache.prune(keep={KEY_A})
        assert busy == [KEY_B]
        assert sorted(r.split()[0] for r in removed) == sorted([f"{KEY_A}{envbuild.BUILD_INFIX}crashed", "py3.11-" + "c" * 16])
        assert cache.lookup(KEY_A) is not None and cache.lookup(KEY_B) is not None
        assert cache.keys() == [KEY_A, KEY_B]
    finally:
        os.close(held)
    assert [e.key for e in cache.entries()] == [KEY_A, KEY_B]


def test_a_lock_file_removed_under_a_waiter_is_not_trusted(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    fd = cache.try_lock(KEY_A, exclusive=True)
    assert fd is not None
    assert cache.try_lock(KEY_A, exclusive=False) is None  # excluded
    os.unlink(cache.lock_path(KEY_A))  # a prune removes it while holding it
    other = cache.try_lock(KEY_A, exclusive=True)  # a new file, a new lock: not blocked by the stale one
    assert other is not None
    assert os.fstat(other).st_ino == os.stat(cache.lock_path(KEY_A)).st_ino
    os.close(fd)
    os.close(other)


# -- builders -------------------------------------------------------------------------------------------


def test_builder_commands(tmp_path: Path) -> None:
    target, req = tmp_path / "env", tmp_path / "env" / "requirements.txt"
    uv = envbuild.Builder("uv", uv="/bin/uv")
    assert uv.venv_step("/usr/bin/python3", target) == ("uv venv", ["/bin/uv", "venv", "--no-project", "--python", "/usr/bin/python3", str(target)])
    assert uv.install_step(target, req)[1][:5] == ["/bin/uv", "pip", "install", "--python", f"{target}/bin/python"]
    mine = envbuild.Builder("venv+pip", daemon_pip=True)
    assert mine.venv_step("/usr/bin/python3", target)[1] == ["/usr/bin/python3", "-m", "venv", "--without-pip", str(target)]
    assert mine.install_step(target, req)[1][:5] == [sys.executable, "-m", "pip", "--python", f"{target}/bin/python"]
    theirs = envbuild.Builder("venv+pip")
    assert theirs.venv_step("/usr/bin/python3", target)[1] == ["/usr/bin/python3", "-m", "venv", str(target)]
    assert theirs.install_step(target, req)[1][:3] == [f"{target}/bin/python", "-m", "pip"]
    assert envbuild.pick_builder("pip").name == "venv+pip"
    if HAVE_UV:
        assert envbuild.pick_builder("auto").name == "uv"


def test_the_builders_error_in_one_line() -> None:
    uv = ["Using Python 3.11.7 environment at: x", "error: No solution found when resolving dependencies", "  cause: Because nosuchpkg was not found"]
    assert envbuild._summary(uv) == "error: No solution found when resolving dependencies cause: Because nosuchpkg was not found"
    pip = [
        "Looking in links: /w",
        "ERROR: Could not find a version that satisfies the requirement nosuchpkg",
        "ERROR: No matching distribution found for nosuchpkg",
    ]
    assert envbuild._summary(pip) == "ERROR: No matching distribution found for nosuchpkg"
    assert envbuild._summary(["$ uv venv", "something odd"]) == "something odd"


# -- real builds ----------------------------------------------------------------------------------------


def version_in(python: str) -> str:
    out = subprocess.run([python, "-c", "import verpkg; print(verpkg.__version__)"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not HAVE_UV, reason="uv is not installed (pip install uv; the test extra has it)")
async def test_pools_with_one_definition_share_one_build(tmp_path: Path, wheels: Path) -> None:
    spec = env_spec(requirements=["--no-index", f"--find-links {wheels}", "verpkg==1.0"])
    daemon = daemon_config(tmp_path / "envs")
    envs = [envbuild.PoolEnv(name, spec, daemon) for name in ("a", "b")]
    await asyncio.gather(*(e.prepare() for e in envs))
    assert [e.state for e in envs] == ["ready", "ready"], [e.error for e in envs]
    a, b = envs
    assert a.key == b.key and a.path == b.path and a.builder == "uv"
    assert [a.reused, b.reused] == [False, False]  # one build, both waited for it
    assert len(list((tmp_path / "envs").glob("py*.build-*"))) == 1
    assert a.python is not None and version_in(a.python) == "1.0"
    marker = json.loads((Path(a.python).parent.parent / envbuild.MARKER).read_text())
    assert marker["builder"] == "uv" and marker["requirements"][-1] == "verpkg==1.0" and marker["python"]["version"][:2] == list(sys.version_info[:2])
    # held while in use: a prune leaves it alone
    assert Cache(tmp_path / "envs").prune(keep=set()) == ([], [a.key])
    for e in envs:
        e.close()
    # built: the next one reuses it
    again = envbuild.PoolEnv("c", spec, daemon, hold=False)
    await again.prepare()
    assert again.state == "ready" and again.reused and again.path == a.path


async def test_the_venv_and_pip_fallback_builds_too(tmp_path: Path, wheels: Path) -> None:
    spec = env_spec(requirements=["--no-index", f"--find-links {wheels}", "verpkg==2.0"])
    env = envbuild.PoolEnv("p", spec, daemon_config(tmp_path / "envs", env_builder="pip"), hold=False)
    await env.prepare()
    assert env.state == "ready", env.error
    assert env.builder == "venv+pip" and env.python is not None and version_in(env.python) == "2.0"


@pytest.mark.skipif(not HAVE_UV, reason="uv is not installed")
async def test_a_failed_build_leaves_nothing_behind_and_says_why(tmp_path: Path, wheels: Path) -> None:
    spec = env_spec(requirements=["--no-index", f"--find-links {wheels}", "nosuchpkg-cruised-test==1.0"])
    env = envbuild.PoolEnv("p", spec, daemon_config(tmp_path / "envs"))
    await env.prepare()
    assert env.state == "failed" and env.error is not None
    assert env.error.startswith("uv pip install failed (exit code 1): error: No solution found") and "nosuchpkg-cruised-test" in env.error
    assert (env.unavailable() or "").startswith("code env build failed: uv pip install failed")
    assert list((tmp_path / "envs").glob("py*.build-*")) == []  # the half-built venv is gone
    env.close()


async def test_a_build_past_its_timeout_is_killed(tmp_path: Path) -> None:
    # an interpreter that never answers: the probe is the first step to outlive the deadline
    slow = tmp_path / "slowpython"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    env = envbuild.PoolEnv("p", env_spec(python=str(slow)), daemon_config(tmp_path / "envs", env_build_timeout=config.Duration(0.5)))
    await asyncio.wait_for(env.prepare(), 30)
    assert env.state == "failed" and "did not answer in time" in (env.error or "")


def test_the_lock_is_a_real_flock(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    fd = cache.try_lock(KEY_A, exclusive=False)
    assert fd is not None
    with open(cache.lock_path(KEY_A), "rb") as fh:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
