"""Bounded load loops that count every answer: the no-lost-request tests of reload and code envs."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from typing import Any

#: a load loop's bound; normally ended by its ``stop`` event long before
ROUNDS = 20_000


class Tally:
    """What the loops saw: ok and failed counts, the answers in order, the first ten failures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.answers: list[str] = []
        self.failures: list[str] = []

    def record(self, ok: bool, what: str) -> None:
        with self.lock:
            if ok:
                self.ok += 1
                self.answers.append(what)
            else:
                self.failed += 1
                if len(self.failures) < 10:
                    self.failures.append(what)


def http_loop(target: Any, path: str, body: bytes, stop: threading.Event, tally: Tally, answer: Callable[[Any], str]) -> None:
    """POST ``body`` to ``path`` on one keep-alive connection until ``stop``; ``answer(response)``
    names a 200's JSON response in the tally. A broken connection is counted and reopened."""
    conn: http.client.HTTPConnection | None = None
    for _ in range(ROUNDS):
        if stop.is_set():
            break
        try:
            conn = conn or target.connection(30)
            conn.request("POST", path, body=body)
            resp = conn.getresponse()
            data = resp.read()
            tally.record(resp.status == 200, answer(json.loads(data)["response"]) if resp.status == 200 else f"{resp.status} {data[:300]!r}")
        except (OSError, http.client.HTTPException) as exc:
            tally.record(False, f"{type(exc).__name__}: {exc}")
            conn = None
    if conn is not None:
        conn.close()
