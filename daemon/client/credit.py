"""Flow control of a pipelined submitter (``Session.map``): the credit the daemon grants a connection.

A ``map`` must not discover the pool's limit by being refused: it asks the
daemon for credit on its pool (a CREDIT request, pool/wire/frames.py), sends
one call per credit, flagged ``CREDITED`` (never refused QueueFull: each
credit is a place the daemon reserved in the queue), and waits when it has
none. The daemon grants more as its calls leave the queue, and never more
than the caller's share (``max_queued_per_caller``), so a ``map`` keeps the
workers busy without filling the queue against other callers
(daemon/core/fairness.py "Credit").

One ``CreditGate`` per connection and pool, shared by the maps running on it
(they open it together and the last one closes it). The reader thread (any
thread reading the socket, session.py "Threading model") adds grants; the
maps take them. A grant that arrives while the gate is not open is dropped:
the daemon sends grants only to an open account, and a close's answer comes
after every grant sent before it, so nothing is lost or counted twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class CreditGate:
    """The credit one connection holds on one pool and has not spent."""

    __slots__ = ("_lock", "_wake", "available", "pool", "state", "users")

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self.available = 0
        #: maps using it; the first opens flow control with the daemon, the last closes it
        self.users = 0
        #: "closed", "opening", "open", "closing"; "unsupported" if the daemon refused (an older one)
        self.state = "closed"
        #: the maps waiting for the next grant: each is woken by it (several maps share a gate, and
        #: one slot lost every waiter but the last: a map waited for good with credit in the gate)
        self._wake: list[Callable[[], None]] = []

    def opened(self, granted: int) -> None:
        """The daemon answered the open: ``granted`` credits to start with."""
        with self._lock:
            self.state = "open"
            self.available += granted

    def granted(self, n: int) -> None:
        """A grant arrived (on whichever thread reads the socket)."""
        with self._lock:
            if self.state != "open":
                return
            self.available += n
            wake, self._wake = self._wake, []
        for w in wake:  # each map takes what it can; one that finds none waits again
            w()

    def take(self, n: int) -> int:
        """Spend up to ``n`` credits; how many were taken (each pays for one CALL flagged CREDITED)."""
        with self._lock:
            taken = min(n, self.available)
            self.available -= taken
            return taken

    def give_back(self, n: int) -> None:
        """Credits taken and not used after all (the items ran out)."""
        if n:
            with self._lock:
                self.available += n

    def on_grant(self, wake: Callable[[], None]) -> bool:
        """Call ``wake`` at the next grant; False (and no call) if credit is already there."""
        with self._lock:
            if self.available:
                return False
            self._wake.append(wake)
            return True

    def closing(self) -> None:
        """The close is on its way: grants from now on are void."""
        with self._lock:
            self.state = "closing"
            self.available = 0
            self._wake = []
