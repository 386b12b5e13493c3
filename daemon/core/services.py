"""Endpoints seen from the daemon: which pool serves which, and how each is doing.

The config names the endpoints (``services.<service>.endpoints.<endpoint>``)
and the pool of each; the workers report, in their READY frame, whether each
endpoint's code loaded (pool/endpoint.py). Every worker of a pool loads the
same files, so the latest report of a pool stands for all its workers
(``Dispatcher.ready_info``). From those two sources this module answers:

* what a pool's workers must load (``worker_specs``, sent in the spawn spec);
* the state of one endpoint: ``loaded``, ``failed`` (its code raised: the
  HTTP door answers 503 without queueing), ``loading`` (no worker has
  reported yet) or ``pool_unavailable`` (no worker is up and starting one
  fails, e.g. a code env's interpreter is missing);
* the services section of ``/status`` and the reasons ``/readyz`` is not
  ready yet.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cruised.config import Config
from cruised.core import envbuild
from cruised.core.dispatch import Dispatcher, WorkerState

if TYPE_CHECKING:
    from cruised.core.generation import Pool

log = logging.getLogger("cruised.services")


def worker_specs(config: Config, pool: str) -> dict[str, dict[str, Any]]:
    """``"service/endpoint"`` -> what a worker of ``pool`` loads for it."""
    return {name: {"code": ep.code, "function": ep.function, "folders": list(ep.folders)} for name, (_, _, ep) in config.endpoints().items() if ep.pool == pool}


@dataclass(frozen=True)
class EndpointState:
    state: str  # loaded | failed | loading | pool_unavailable
    error: str | None = None
    traceback: str | None = None


#: the common answer, made once (the HTTP door asks on every request)
LOADED = EndpointState("loaded")


def pool_unavailable(disp: Dispatcher) -> str | None:
    """Why ``disp`` cannot serve now (no worker up, and starting one fails), else None.

    ``last_error`` is set by a failed start (of a worker or of the template)
    and cleared by the next worker that gets ready, so it reads "the latest
    attempt failed".
    """
    c = disp.counts
    if c[WorkerState.IDLE] + c[WorkerState.BUSY] == 0:
        if disp.env is not None and not disp.env.ready:
            return disp.env.unavailable()  # "building env (12s): ...", or why its build failed
        if disp.last_error:
            return disp.last_error
    return None


def endpoint_state(disp: Dispatcher, name: str) -> EndpointState:
    report = (disp.ready_info.get("endpoints") or {}).get(name)
    if report is None:
        why = pool_unavailable(disp)
        if why is not None:
            return EndpointState("pool_unavailable", f"pool {disp.name!r} cannot start workers: {why}")
        return EndpointState("loading")
    if report.get("ok"):
        return LOADED
    return EndpointState("failed", report.get("error"), report.get("traceback"))


def describe(config: Config, dispatchers: Mapping[str, Dispatcher]) -> dict[str, Any]:
    """The ``services`` section of the status: every endpoint of ``config`` with its state.

    ``dispatchers``: the serving generation's, by pool name (a pool missing
    there makes its endpoints ``pool_unavailable``).
    """
    out: dict[str, Any] = {}
    for sname, service in config.services.items():
        endpoints: dict[str, Any] = {}
        for ename, ep in service.endpoints.items():
            disp = dispatchers.get(ep.pool)
            st = endpoint_state(disp, f"{sname}/{ename}") if disp is not None else EndpointState("pool_unavailable", "no such pool")
            endpoints[ename] = {
                "pool": ep.pool,
                "state": st.state,
                "error": st.error,
                "traceback": st.traceback,
                "code": ep.code,
                "function": ep.function,
                "folders": list(ep.folders),
                "description": ep.description,
                "test_queries": [dict(q) for q in ep.test_queries],
            }
        out[sname] = {
            "description": service.description,
            "api_keys": bool(service.api_keys or service.api_keys_file),
            "endpoints": endpoints,
        }
    return out


def readiness(config: Config, dispatchers: Mapping[str, Dispatcher]) -> list[str]:
    """Why the pools and endpoints of ``config`` cannot all serve yet (empty: ready).

    ``dispatchers``: the serving generation's, by pool name. A daemon that is
    stopping is not ready whatever this says (the supervisor checks that first).
    """
    reasons = []
    for name, d in dispatchers.items():
        if not envbuild.required(d.config):
            continue  # the daemon is ready without it (a code env pool, by default)
        if not d.ready():
            warm = d.counts[WorkerState.IDLE] + d.counts[WorkerState.BUSY]
            why = pool_unavailable(d) or d.last_error  # with a code env: "building env (12s): ..."
            detail = f": {why}" if why else ""
            reasons.append(f"pool {name}: {warm}/{d.config.min} warm workers{detail}")
    for name, (_, _, ep) in config.endpoints().items():
        disp = dispatchers.get(ep.pool)
        if disp is None:
            reasons.append(f"endpoint {name}: no pool {ep.pool!r}")
            continue
        if not envbuild.required(disp.config):
            continue
        st = endpoint_state(disp, name)
        if st.state != "loaded":
            reasons.append(f"endpoint {name}: {st.state}" + (f": {st.error}" if st.error else ""))
    return reasons


def log_new_failures(pool: Pool) -> None:
    """One ERROR line per endpoint of ``pool`` whose code failed to load (each worker's own output has the traceback)."""
    reports = pool.dispatcher.ready_info.get("endpoints") or {}
    for name, report in reports.items():
        if not report.get("ok") and name not in pool.failed_endpoints:
            pool.failed_endpoints.add(name)
            log.error(
                "endpoint %s unavailable (pool=%s): its code failed to load: %s; it answers 503 until fixed and reloaded", name, pool.name, report.get("error")
            )
