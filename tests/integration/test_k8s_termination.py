"""The kubelet's termination sequence, replayed against a live daemon under load.

When a pod is deleted, Kubernetes removes it from the Service's endpoints while
the kubelet runs the preStop hook, then sends SIGTERM, then SIGKILL once
terminationGracePeriodSeconds have passed since the hook started. Here the
"Service" is a router in the test: client threads send endpoint calls over TCP
to the pods it lists, and a prober polls /readyz as the readinessProbe does
and drops a pod at its first 503. The pod is the shipped config
(deploy/k8s/base/config.yaml) with the timeline scaled down to seconds; the
preStop hook is the Deployment's own command.

* Endpoints removed promptly (before the hook's drain lands, the ideal
  ordering): no call fails, the hook returns 0 once in-flight calls are done,
  and the daemon exits 0 on SIGTERM well within the grace.
* Endpoint removal lagging past the grace (traffic keeps coming): every call
  accepted before the drain is answered, except one still running at the
  SIGKILL; what fails is only that call and calls refused without running
  (503 Draining / ShuttingDown, or a closed port), which a client or ingress can
  retry elsewhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cruised.client.http import Target, request, run_path
from support import httphelp
from support.daemon import Daemon, wait_for
from support.deploy import K8S, pod_config

#: the scaled-down timeline: drain timeout, grace (both from the kubelet's side), the daemon's own
DRAIN_TIMEOUT = 4.0
SHORT_CALL_MS = 150
MAX_CALLS_PER_CLIENT = 400  # bounded load: a client stops at this count whatever happens
CLIENTS = 3

WORK = """
import time


def work(ms=0):
    time.sleep(ms / 1000)
    return {"slept_ms": ms}
"""


def scaled_pod(short_dir: Path, shutdown_grace: str) -> dict[str, Any]:
    """The ConfigMap's config, its timeline in seconds, plus an endpoint to call over TCP."""
    cfg = pod_config(short_dir)
    cfg["daemon"].update({"shutdown_grace": shutdown_grace, "kill_grace": "1s"})
    cfg["pools"]["default"].update({"queue_timeout": "1s", "exec_timeout": "30s"})
    code = httphelp.write(short_dir / "work.py", WORK)
    cfg["services"] = {"k8s": {"endpoints": {"work": {"code": code, "function": "work"}}}}
    return cfg


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | None  # None: no HTTP answer (connection refused or reset)
    error: str = ""


@dataclass
class Router:
    """A Service with one pod: clients send while it lists the pod; the prober drops it at readyz 503."""

    target: Target
    listed: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    readyz_503_at: float | None = None
    follow_readiness: bool = True

    def client(self, index: int) -> None:
        for _ in range(MAX_CALLS_PER_CLIENT):
            if self.stop.is_set():
                return
            if not self.listed.is_set():
                self.stop.wait(0.01)
                continue
            self.outcomes.append(self.call(SHORT_CALL_MS))

    def call(self, ms: int) -> Outcome:
        sent = time.monotonic()
        try:
            resp = request(self.target, "POST", run_path("k8s", "work"), json.dumps({"ms": ms}).encode(), timeout=60)
        except OSError as exc:
            return Outcome(sent, time.monotonic(), None, repr(exc))
        error = "" if resp.status == 200 else str(resp.json().get("errorType"))
        return Outcome(sent, time.monotonic(), resp.status, error)

    def prober(self) -> None:
        """The readinessProbe (periodSeconds scaled down): the first 503 takes the pod out."""
        while not self.stop.wait(0.05):
            try:
                status = httphelp.get(self.target, "/readyz").status
            except OSError:
                status = None
            if status == 503 and self.readyz_503_at is None:
                self.readyz_503_at = time.monotonic()
                if self.follow_readiness:
                    self.listed.clear()


@dataclass
class Termination:
    """What the replayed kubelet saw."""

    started: float
    prestop_code: int
    prestop_output: str
    sigterm_at: float
    exit_code: int | None  # None: SIGKILLed at the grace
    ended: float
    readyz_after_hook: int | None  # /readyz between the hook's end and SIGTERM


def kubelet_terminate(d: Daemon, grace: float, remove_endpoint: Callable[[], None]) -> Termination:
    """The kubelet's sequence for a deleted pod: endpoint removal and preStop, SIGTERM, SIGKILL at the grace."""
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    command = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:4] == ["cruised", "drain", "--wait", "--timeout"]
    command = [*command[:4], f"{DRAIN_TIMEOUT:g}"]  # the hook as shipped, its timeout scaled down
    started = time.monotonic()
    remove_endpoint()
    try:
        hook = d.cli(*command[1:], timeout=grace)
        code, output = hook.returncode, hook.stdout + hook.stderr
    except subprocess.TimeoutExpired:
        code, output = -1, "preStop still running at the grace"
    try:
        readyz: int | None = httphelp.get(httphelp.tcp(d), "/readyz").status
    except OSError:
        readyz = None
    sigterm_at = time.monotonic()
    d.signal(signal.SIGTERM)  # the kubelet sends it after preStop, whatever the hook returned
    assert d.proc is not None
    try:
        exit_code: int | None = d.proc.wait(timeout=max(0.0, started + grace - time.monotonic()))
    except subprocess.TimeoutExpired:
        d.proc.kill()  # SIGKILL at the grace: the daemon's process group goes too (cleanup checks)
        d.proc.wait()
        exit_code = None
    return Termination(started, code, output, sigterm_at, exit_code, time.monotonic(), readyz)


def run_load(router: Router) -> list[threading.Thread]:
    threads = [threading.Thread(target=router.client, args=(i,), daemon=True) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=router.prober, daemon=True))
    router.listed.set()
    for t in threads:
        t.start()
    wait_for(lambda: sum(o.status == 200 for o in router.outcomes) >= 10, what="steady load")
    return threads


def finish(router: Router, threads: list[threading.Thread]) -> None:
    router.stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


def test_prompt_endpoint_removal_loses_no_call(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    grace = 12.0  # > DRAIN_TIMEOUT + the longest call, as the Deployment's grace is
    d = start_daemon(scaled_pod(short_dir, shutdown_grace="5s"))
    router = Router(httphelp.tcp(d))
    threads = run_load(router)
    try:
        t = kubelet_terminate(d, grace, remove_endpoint=router.listed.clear)
    finally:
        finish(router, threads)
    failed = [o for o in router.outcomes if o.status != 200]
    assert not failed, failed[:5]
    assert t.prestop_code == 0, t.prestop_output
    assert t.exit_code == 0, d.log()[-3000:]
    assert t.ended - t.started < grace
    assert t.readyz_after_hook == 503, "after the hook, until SIGTERM, the pod must say it is not ready"
    assert len(router.outcomes) >= 10


def test_lagging_endpoint_removal_fails_only_refused_calls_and_the_one_past_the_grace(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    grace = 8.0
    # shutdown_grace longer than the kubelet's grace: the daemon would wait, the kubelet does not
    d = start_daemon(scaled_pod(short_dir, shutdown_grace="30s"))
    router = Router(httphelp.tcp(d), follow_readiness=False)  # the endpoint is never removed in time
    long_call: list[Outcome] = []
    # the long call first, alone, so it is surely running (not queued) when the kubelet starts
    long_thread = threading.Thread(target=lambda: long_call.append(router.call(20_000)), daemon=True)
    long_thread.start()
    wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="the long call running")
    threads = run_load(router)
    try:
        t = kubelet_terminate(d, grace, remove_endpoint=lambda: None)
        long_thread.join(timeout=30)
    finally:
        finish(router, threads)

    assert t.prestop_code == 1, f"the drain cannot finish while the long call runs: {t.prestop_output}"
    assert t.exit_code is None, "the daemon was still finishing the long call at the grace: SIGKILLed"
    assert long_call and long_call[0].status is None, f"the call running past the grace is lost: {long_call}"

    drained = router.readyz_503_at
    assert drained is not None
    refused = {"Draining", "ShuttingDown"}
    for o in router.outcomes:
        if o.status == 200:
            continue
        # every other failure was refused without running, after the drain began
        assert o.sent >= t.started - 0.5, o
        assert (o.status == 503 and o.error in refused) or (o.status is None and o.sent >= t.sigterm_at), o
    # sent before the kubelet started (the hook's drain lands later still): admitted, so answered
    before = [o for o in router.outcomes if o.sent < t.started]
    assert before and all(o.status == 200 for o in before), [o for o in before if o.status != 200][:5]
    assert any(o.status == 503 for o in router.outcomes), "traffic kept coming during the drain: some must have been refused"
