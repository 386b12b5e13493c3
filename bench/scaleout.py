"""Scale-out row: calls/s through HAProxy to three daemons against one daemon direct.

``python -m bench.scaleout [--calls N] [--clients C]``. Three daemons on
127.0.0.2, .3 and .4 (2 workers per pool each) and HAProxy on
deploy/haproxy/cruised.cfg (bench/lbfront.py rewrites its addresses); the
same closed-loop clients run once against daemon 1's own door and once
against HAProxy's. Rows:

* ``http nap`` a 10 ms endpoint (the work waits, as a kdb+ query does): the
  ratio is the capacity gained, ideally 3x;
* ``http add`` a trivial endpoint: on one machine this shows HAProxy's cost,
  since the three daemons share its cores (on three hosts it would scale too);
* ``native nap map`` one remote session's ``map`` (mutual TLS; through HAProxy
  with ``connections=3``, one per daemon) of the 10 ms function.

Only the ratio is meaningful: the daemons, HAProxy and the clients share this
machine's cores. Needs the haproxy binary (skipped with a note otherwise) and
trustme for the native row's certificates (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import lbfront
from .daemon import BenchDaemon

NAP_MS = 10
ENDPOINTS = f"""
import time


def nap():
    time.sleep({NAP_MS / 1000})
    return 1


def add(a, b):
    return a + b
"""


def nap_native(_: int) -> int:
    import time

    time.sleep(NAP_MS / 1000)
    return 1


def config(host: str, ports: lbfront.Ports, code: str, remote: dict[str, Any] | None) -> dict[str, Any]:
    fixed = {"min": 2, "cruise": 2, "max": 2, "queue_size": 64, "queue_timeout": "30s"}
    cfg: dict[str, Any] = {
        "daemon": {"access_log": False},
        "pools": {"web": fixed, "default": fixed},
        "services": {"bench": {"endpoints": {n: {"code": code, "function": n, "pool": "web"} for n in ("nap", "add")}}},
        "http": {"listen": f"{host}:{ports.http}"},
        "health": {"agent": f"{host}:{ports.agent}", "pools": ["web"]},
    }
    if remote is not None:
        cfg["remote"] = {**remote, "listen": f"{host}:{ports.remote}"}
    return cfg


def http_rate(host: str, port: int, endpoint: str, body: bytes, calls: int, clients: int) -> float:
    """calls/s of ``clients`` keep-alive connections making ``calls`` POSTs in all (every answer checked)."""
    per = [calls // clients + (1 if i < calls % clients else 0) for i in range(clients)]
    start = threading.Barrier(clients + 1)
    errors: list[str] = []

    def run(n: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        start.wait()
        try:
            for _ in range(n):
                conn.request("POST", f"/public/api/v1/bench/{endpoint}/run", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {data[:200]!r}")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in per]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{endpoint} via {host}:{port}: {errors[0]}")
    return calls / elapsed


def native_rate(host: str, port: int, tls: Any, connections: int, calls: int) -> float:
    import cruised

    with cruised.session(host=host, port=port, tls=tls, connections=connections) as s:
        s.call(nap_native, 0)  # connect and register first
        list(s.map(nap_native, range(3 * connections)))  # every connection registered
        t0 = time.perf_counter()
        done = sum(s.map(nap_native, range(calls)))
        elapsed = time.perf_counter() - t0
    assert done == calls
    return calls / elapsed


def certificates(directory: Path) -> tuple[dict[str, Any], Any] | None:
    """The daemons' ``remote`` section and a client's cruised.TLS, minted with trustme; None without it."""
    try:
        import trustme
    except ImportError:
        return None
    import cruised

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", *lbfront.HOSTS)
    client = ca.issue_cert("bench.clients.invalid", common_name="bench")
    files = {}
    for name, blob in (("ca.pem", ca.cert_pem), ("server.key", server.private_key_pem), ("client.key", client.private_key_pem)):
        files[name] = str(directory / name)
        blob.write_to_path(files[name])
    for name, leaf in (("server.pem", server), ("client.pem", client)):
        files[name] = str(directory / name)
        Path(files[name]).write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    remote = {"cert_file": files["server.pem"], "key_file": files["server.key"], "client_ca_file": files["ca.pem"], "allowed_clients": ["bench"]}
    return remote, cruised.TLS(cert_file=files["client.pem"], key_file=files["client.key"], ca_file=files["ca.pem"])


def run(calls: int, clients: int) -> dict[str, Any]:
    binary = lbfront.haproxy_binary()
    if binary is None:
        return {"skipped": "no haproxy binary (apt-get install haproxy)"}
    work = Path(tempfile.mkdtemp(prefix="crscale"))
    code = work / "bench_endpoints.py"
    code.write_text(ENDPOINTS)
    pki = certificates(work)
    ports = lbfront.Ports.pick()
    daemons = [BenchDaemon(2, config=config(host, ports, str(code), pki[0] if pki else None)) for host in lbfront.HOSTS]
    front = None
    rows: list[dict[str, Any]] = []
    try:
        for d in daemons:
            d.start()
        front = lbfront.launch(binary, ports, work)
        deadline = time.monotonic() + 30
        while any(r["status"] != "UP" for r in front.servers("cruised_http").values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy did not see the daemons UP: {front.servers('cruised_http')}")
            time.sleep(0.1)
        direct_host, lb_host = lbfront.HOSTS[0], "127.0.0.1"
        for name, endpoint, body, n in (
            (f"http nap {NAP_MS} ms", "nap", b"{}", calls),
            ("http add", "add", b'{"a": 1, "b": 2}', calls * 3),
        ):
            http_rate(direct_host, ports.http, endpoint, body, clients * 4, clients)  # warm-up: connections, code
            one = http_rate(direct_host, ports.http, endpoint, body, n, clients)
            three = http_rate(lb_host, ports.front_http, endpoint, body, n, clients)
            rows.append({"row": name, "clients": clients, "calls": n, "one_direct": one, "three_via_haproxy": three, "ratio": three / one})
        if pki is None:
            rows.append({"row": f"native nap {NAP_MS} ms map", "skipped": "trustme is not installed (pip install -e '.[test]')"})
        else:
            one = native_rate(direct_host, ports.remote, pki[1], 1, calls)
            three = native_rate(lb_host, ports.front_remote, pki[1], 3, calls)
            rows.append(
                {"row": f"native nap {NAP_MS} ms map", "clients": 1, "calls": calls, "one_direct": one, "three_via_haproxy": three, "ratio": three / one}
            )
    finally:
        if front is not None:
            front.stop()
        for d in daemons:
            d.cleanup()
    return {"rows": rows}


def markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"scale-out: skipped ({result['skipped']})"
    lines = [
        "| row | clients | calls | 1 daemon direct (calls/s) | 3 daemons via HAProxy (calls/s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | | | skipped: {r['skipped']} | | |")
        else:
            lines.append(f"| {r['row']} | {r['clients']} | {r['calls']} | {r['one_direct']:,.0f} | {r['three_via_haproxy']:,.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000, help="calls per row (the trivial row makes 3x as many)")
    ap.add_argument("--clients", type=int, default=12, help="concurrent HTTP clients (keep-alive connections)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = ap.parse_args(argv)
    result = run(args.calls, args.clients)
    print(markdown(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
