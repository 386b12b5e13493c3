"""The client's side of flow control (daemon/client/credit.py): what a map may send, and when it wakes."""

from __future__ import annotations

from cruised.client.credit import CreditGate


def test_grants_count_only_while_open_and_a_close_voids_the_rest() -> None:
    gate = CreditGate("p")
    gate.granted(5)
    assert gate.take(10) == 0, "a grant before the open answer belongs to no account of ours"
    gate.opened(3)
    gate.granted(2)
    assert gate.take(4) == 4 and gate.take(4) == 1
    gate.give_back(2)
    assert gate.available == 2
    gate.closing()
    gate.granted(7)
    assert gate.available == 0 and gate.take(1) == 0


def test_a_waiting_map_is_woken_by_the_next_grant_only() -> None:
    gate = CreditGate("p")
    gate.opened(1)
    woken: list[int] = []
    assert not gate.on_grant(lambda: woken.append(1)), "credit is there: no wait"
    assert gate.take(1) == 1
    assert gate.on_grant(lambda: woken.append(2))
    gate.granted(3)
    gate.granted(1)
    assert woken == [2] and gate.available == 4


def test_every_map_waiting_on_a_shared_gate_is_woken_by_the_next_grant() -> None:
    # 8 threads mapping on one session share the gate; with one wake slot the first waiter was
    # forgotten and waited for good while the others spent the grant (bench --sections trivial, threads8)
    gate = CreditGate("p")
    gate.opened(0)
    woken: list[str] = []
    assert gate.on_grant(lambda: woken.append("a"))
    assert gate.on_grant(lambda: woken.append("b"))
    gate.granted(2)
    assert sorted(woken) == ["a", "b"] and gate.available == 2
    gate.granted(1)
    assert len(woken) == 2, "a grant wakes only the maps waiting when it came"
