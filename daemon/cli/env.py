"""Command line for code envs: ``cruised env build | list | prune`` (daemon/core/envbuild.py builds them).

``build`` builds the envs of a config's pools ahead of time (an image build
step, a deploy), exactly as the daemon would (same directory, same keys, same
locks), so the daemon then starts as fast as with a plain pool. ``list`` shows
the envs in ``daemon.env_dir`` with their size, age and the config's pools that
use them; ``prune`` removes the ones none of those pools uses and no running
daemon holds.

The config is ``--config FILE``, else ``$CRUISED_CONFIG``, ``./config.yaml`` or
``/etc/cruised/config.yaml``, the first that exists. Run these as the daemon's
user (``runuser -u cruised -- cruised env build``): the envs must be readable by
it, and a venv cannot move once built.

Exit codes: 0 success, 1 a build failed (or an env's key could not be found, for
``prune``), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from cruised import config as config_mod
from cruised.config import Config, ConfigErrors
from cruised.core import envbuild

SYSTEM_CONFIG = "/etc/cruised/config.yaml"


def add_commands(sub: Any) -> None:
    p = sub.add_parser("env", help="code envs built from the pools' definitions (code_env): build ahead of time, list, prune")
    env_sub = p.add_subparsers(dest="env_command", required=True, metavar="{build,list,prune}")

    def config_option(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", "-c", help=f"YAML configuration (default: $CRUISED_CONFIG, ./config.yaml or {SYSTEM_CONFIG})")

    q = env_sub.add_parser("build", help="build the code envs of the config's pools now (those already built are reused)")
    config_option(q)
    q.add_argument("pool", nargs="?", help="only this pool's env")
    q.set_defaults(func=cmd_build)

    q = env_sub.add_parser("list", help="the built code envs: key, size, age, builder, and the config's pools that use each")
    config_option(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = env_sub.add_parser("prune", help="remove the code envs no pool of the config uses (never one a running daemon holds)")
    config_option(q)
    q.add_argument("--dry-run", "-n", action="store_true", help="only say what would be removed")
    q.set_defaults(func=cmd_prune)


class UsageError(Exception):
    pass


def config_path(given: str | None) -> str:
    if given:
        return given
    for candidate in (os.environ.get("CRUISED_CONFIG"), "config.yaml", SYSTEM_CONFIG):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise UsageError(f"no config: give --config FILE (or set $CRUISED_CONFIG; ./config.yaml and {SYSTEM_CONFIG} do not exist)")


def _load(args: argparse.Namespace) -> tuple[str, Config]:
    path = config_path(args.config)
    try:
        return path, config_mod.load(path)
    except ConfigErrors as exc:
        raise UsageError("\n".join(f"{path}: {e}" for e in exc.errors)) from None


def _quiet() -> None:
    # the builder's lines and the outcome are printed here; the module's log lines would repeat them
    logging.getLogger("cruised.envbuild").setLevel(logging.CRITICAL)


def run(func: Any, args: argparse.Namespace) -> int:
    try:
        return int(func(args))
    except UsageError as exc:
        print(f"cruised env: {exc}", file=sys.stderr)
        return 2


def cmd_build(args: argparse.Namespace) -> int:
    return run(_build, args)


def cmd_list(args: argparse.Namespace) -> int:
    return run(_list, args)


def cmd_prune(args: argparse.Namespace) -> int:
    return run(_prune, args)


def _build(args: argparse.Namespace) -> int:
    path, cfg = _load(args)
    _quiet()
    pools = {name: p.code_env for name, p in cfg.pools.items() if p.code_env is not None}
    if args.pool is not None:
        if args.pool not in cfg.pools:
            raise UsageError(f"no pool named {args.pool!r} in {path} (configured: {', '.join(sorted(cfg.pools))})")
        if args.pool not in pools:
            raise UsageError(f"pool {args.pool!r} has no code_env in {path}")
        pools = {args.pool: pools[args.pool]}
    if not pools:
        print(f"{path}: no pool has a code_env; nothing to build")
        return 0

    def echo(key: str, line: str) -> None:
        print(f"[{key}] {line}", flush=True)

    async def build_all() -> list[envbuild.PoolEnv]:
        envs = [envbuild.PoolEnv(name, spec, cfg.daemon, hold=False, echo=echo) for name, spec in pools.items()]
        await asyncio.gather(*(e.prepare() for e in envs))
        return envs

    failed = 0
    for env in asyncio.run(build_all()):
        if env.ready:
            how = f"reused ({env.builder} build)" if env.reused else f"built by {env.builder} in {env.build_s or 0:.1f}s"
            print(f"pool {env.pool}: code env {env.key} {how}: {env.python}")
        else:
            failed += 1
            print(f"pool {env.pool}: code env build failed: {env.error}", file=sys.stderr)
    return 1 if failed else 0


async def _config_keys(cfg: Config) -> dict[str, str | Exception]:
    """Each code_env pool's key (or why it cannot be found)."""
    pools = {name: p.code_env for name, p in cfg.pools.items() if p.code_env is not None}

    async def one(spec: config_mod.CodeEnvConfig) -> str | Exception:
        try:
            return await envbuild.key_of(spec)
        except (envbuild.BuildError, envbuild.DefinitionError) as exc:
            return exc

    keys = await asyncio.gather(*(one(spec) for spec in pools.values()))
    return dict(zip(pools, keys, strict=True))


def _list(args: argparse.Namespace) -> int:
    path, cfg = _load(args)
    cache = envbuild.Cache(envbuild.env_dir(cfg.daemon))
    keys = asyncio.run(_config_keys(cfg))
    users: dict[str, list[str]] = {}
    for pool, key in keys.items():
        if isinstance(key, str):
            users.setdefault(key, []).append(pool)
    entries = cache.entries()
    now = time.time()
    rows = []
    for e in entries:
        m = e.marker
        py = m.get("python") or {}
        version = ".".join(str(v) for v in py.get("version", [])) or "?"
        rows.append(
            {
                "key": e.key,
                "path": str(e.path) if e.path else None,
                "size": e.size,
                "age_s": round(now - float(m["built_at"]), 1) if m.get("built_at") else None,
                "builder": m.get("builder"),
                "build_s": m.get("build_s"),
                "python": version,
                "requirements": m.get("requirements", []),
                "in_use": e.in_use,
                "pools": users.get(e.key, []),
                "unfinished_builds": [p.name for p in e.leftovers],
            }
        )
    if args.json:
        missing = {pool: (k if isinstance(k, str) else f"error: {k}") for pool, k in keys.items()}
        print(json.dumps({"env_dir": str(cache.root), "envs": rows, "config_pools": missing}, indent=2))
        return 0
    print(f"code envs in {cache.root} ({len([r for r in rows if r['path']])}), pools from {path}")
    if rows:
        print(f"{'key':<24} {'size':>9} {'age':>5} {'builder':<9} {'build':>6} {'python':<7} {'in use':<6} pools")
    for r in rows:
        if r["path"] is None:
            print(
                f"{r['key']:<24} {'-':>9} {'-':>5} {'-':<9} {'-':>6} {'-':<7} {'yes' if r['in_use'] else 'no':<6} (not built: {len(r['unfinished_builds'])} unfinished)"
            )
            continue
        age = envbuild.human_age(r["age_s"]) if r["age_s"] is not None else "?"
        build = f"{r['build_s']:.1f}s" if r["build_s"] is not None else "?"
        print(
            f"{r['key']:<24} {envbuild.human_size(r['size']):>9} {age:>5} {r['builder'] or '?':<9} {build:>6} {r['python']:<7} "
            f"{'yes' if r['in_use'] else 'no':<6} {', '.join(r['pools']) or '-'}"
        )
        if r["unfinished_builds"]:
            print(f"  + {len(r['unfinished_builds'])} unfinished build(s): `cruised env prune` removes them")
    for pool, key in keys.items():
        if isinstance(key, str) and key not in {r["key"] for r in rows if r["path"]}:
            print(f"pool {pool}: code env {key} not built yet (`cruised env build {pool}`)")
        elif not isinstance(key, str):
            print(f"pool {pool}: cannot tell its code env: {key}", file=sys.stderr)
    return 0


def _prune(args: argparse.Namespace) -> int:
    _, cfg = _load(args)
    cache = envbuild.Cache(envbuild.env_dir(cfg.daemon))
    keys = asyncio.run(_config_keys(cfg))
    unknown = {pool: k for pool, k in keys.items() if not isinstance(k, str)}
    if unknown:
        for pool, problem in unknown.items():
            print(f"cruised env prune: pool {pool}: cannot tell its code env ({problem}); nothing removed", file=sys.stderr)
        return 1
    keep = {k for k in keys.values() if isinstance(k, str)}
    removed, busy = cache.prune(keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for line in removed:
        print(f"{verb} {line}")
    for key in busy:
        print(f"kept {key}: in use (a running daemon's pool, or a build)")
    if not removed:
        print(f"nothing to remove in {cache.root}")
    return 0


def status_line(env: dict[str, Any]) -> str:
    """One line about a pool's code env for ``cruised status``."""
    key = env.get("key")
    name = f"code env {key}" if key else "code env"
    state = env.get("state")
    if state == "building":
        last = env.get("last_line") or ""
        return f"{name}: building env {env.get('elapsed_s', 0):.0f}s" + (f": {last}" if last else "")
    if state == "ready":
        how = "reused" if env.get("reused") else f"built in {env.get('build_s') or 0:.1f}s"
        return f"{name}: ready, {how} ({env.get('builder') or '?'}), python {env.get('python')}"
    if state == "failed":
        return f"{name}: build failed after {env.get('elapsed_s', 0):.0f}s (the last error above)"
    return f"{name}: {state}"
