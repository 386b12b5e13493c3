"""deploy/prometheus/ and every PromQL query the project ships, checked by promtool and a live daemon.

promtool comes from the OS's ``prometheus`` package (.ci/run installs it). It
checks the rules and runs their unit tests (rules.test.yaml: every alert has a
case where it fires and one where it does not). Every other query the project
ships (the Grafana dashboard's, the KEDA trigger's, the prometheus-adapter
rule's) is wrapped as a recording rule so that ``promtool check rules`` parses
it, and the autoscalers' demand queries are unit-tested the same way. Last,
every metric name any of them uses must exist on a live daemon's /metrics, so
neither the dashboard nor the rules can drift from the code.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import httphelp
from support.daemon import Daemon
from support.deploy import DEPLOY, K8S, ROOT, pod_config, tool

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules.yaml"
RULE_TESTS = PROMETHEUS / "rules.test.yaml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
PROMTOOL = tool("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package; .ci/run installs it)")

#: a metric name of ours in a PromQL expression (recording rules' names have colons and are not metrics)
METRIC = re.compile(r"(?<![\w:])cruised_[a-z0-9_]+(?![\w:])")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["groups"])


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def dashboard_queries() -> list[str]:
    """The dashboard's expressions, its template variable ($pool, a regex matcher) given a value."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert exprs, "the dashboard has no queries"
    return [e.replace("$pool", ".+") for e in exprs]


def keda_query() -> str:
    scaled = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    return str(scaled["spec"]["triggers"][0]["metadata"]["query"])


def adapter_query(pods: str = "a|b") -> str:
    """The prometheus-adapter rule's metricsQuery as the adapter expands it for one namespace's pods."""
    rule = yaml.safe_load((K8S / "hpa" / "prometheus-adapter-rules.yaml").read_text())["rules"][0]
    return str(rule["metricsQuery"]).replace("<<.GroupBy>>", "namespace, pod").replace("<<.LabelMatchers>>", f'namespace="prod",pod=~"{pods}"')


def shipped_queries() -> dict[str, str]:
    queries = {f"dashboard {i}": e for i, e in enumerate(dashboard_queries())}
    for g in rule_groups():
        for r in g["rules"]:
            queries[f"rules {r.get('record') or r.get('alert')}"] = r["expr"]
    queries["keda trigger"] = keda_query()
    queries["prometheus-adapter rule"] = adapter_query()
    return queries


# -- promtool on the rules -------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_runbook_and_a_case_that_fires_and_one_that_does_not() -> None:
    rules = alerts()
    assert set(rules) == {
        "CruisedQueueSaturated",
        "CruisedRejectionsHigh",
        "CruisedExecTimeouts",
        "CruisedWorkerCrashLoop",
        "CruisedQDisconnected",
        "CruisedDown",
    }
    for name, rule in rules.items():
        notes = rule.get("annotations", {})
        assert notes.get("runbook") and notes.get("summary"), f"{name}: a summary and a runbook line"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
    cases: dict[str, list[list[Any]]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case["exp_alerts"])
    for name in rules:
        assert any(expected for expected in cases.get(name, [])), f"{name}: no case where it fires"
        assert any(expected == [] for expected in cases.get(name, [])), f"{name}: no case where it stays quiet"


def test_the_unit_tests_fail_when_an_alert_changes(tmp_path: Path) -> None:
    """Control: the same tests against rules whose saturation threshold moved must fail."""
    changed = RULES.read_text().replace('cruised_queue_capacity{job="cruised"} > 0.8', 'cruised_queue_capacity{job="cruised"} > 0.9')
    assert changed != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(changed)
    (tmp_path / "rules.test.yaml").write_text(RULE_TESTS.read_text())
    tested = promtool("test", "rules", str(tmp_path / "rules.test.yaml"))
    assert tested.returncode != 0 and "CruisedQueueSaturated" in tested.stdout + tested.stderr


# -- every shipped query parses; the autoscalers' demand is what they think ------------------------


def test_every_shipped_query_parses(tmp_path: Path) -> None:
    queries = shipped_queries()
    wrapped = {"groups": [{"name": "parse", "rules": [{"record": f"check:query_{i}", "expr": q} for i, q in enumerate(queries.values())]}]}
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(wrapped))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}\n" + "\n".join(f"query_{i}: {k}" for i, k in enumerate(queries))
    # control: a broken expression is caught the same way
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse", "rules": [{"record": "check:broken", "expr": "sum(cruised_workers{state=busy})"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_the_autoscalers_queries_compute_demand(tmp_path: Path) -> None:
    """KEDA divides its query by the threshold; prometheus-adapter serves its query per pod. Pod a:
    3 queued + 2 busy; pod b: 1 queued + 1 busy (+ 1 idle, which is not demand)."""
    series = []
    for pod, depth, busy, idle in (("a", 3, 2, 0), ("b", 1, 1, 1)):
        labels = f'job="cruised",namespace="prod",pod="{pod}",instance="{pod}:9580",pool="default"'
        series += [
            {"series": f"cruised_queue_depth{{{labels}}}", "values": f"{depth}x5"},
            {"series": f'cruised_workers{{{labels},state="busy"}}', "values": f"{busy}x5"},
            {"series": f'cruised_workers{{{labels},state="idle"}}', "values": f"{idle}x5"},
        ]
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": keda_query(), "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 7}]},
                    {
                        "expr": adapter_query(),
                        "eval_time": "2m",
                        "exp_samples": [{"labels": '{namespace="prod",pod="a"}', "value": 5}, {"labels": '{namespace="prod",pod="b"}', "value": 2}],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "demand.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    tested = promtool("test", "rules", str(path))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_scrape_config_gives_the_labels_the_queries_use() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yaml").read_text())
    assert config["rule_files"] == ["rules.yaml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cruised" and job["metrics_path"] == "/metrics"
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets
    for name, query in shipped_queries().items():
        if name.startswith("dashboard"):
            continue  # the dashboard filters by its own variables
        assert 'job="cruised"' in query or "cruised_pool:" in query or "cruised_endpoint:" in query, f"{name} must select the scrape job: {query}"


# -- against a live daemon -------------------------------------------------------------------------


def exposed_names(text: str) -> set[str]:
    """Every sample name /metrics can carry, from its TYPE lines (a family with no sample yet counts)."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()  # a counter's TYPE line already names its _total sample
            names |= {name + s for s in suffixes.get(kind, ("",))}
    return names


def test_every_metric_name_the_queries_use_exists_on_a_live_daemon(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    d = start_daemon(pod_config(short_dir))
    scraped = httphelp.get(httphelp.tcp(d), "/metrics")  # where Prometheus scrapes it: the HTTP door on TCP
    assert scraped.status == 200
    exposed = exposed_names(scraped.body.decode())
    assert "cruised_workers" in exposed and "cruised_requests_total" in exposed
    used: dict[str, set[str]] = {}
    for where, query in shipped_queries().items():
        for name in METRIC.findall(query):
            used.setdefault(name, set()).add(where)
    assert len(used) >= 10, used
    unknown = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not unknown, f"metric names no daemon exports: {unknown}"
