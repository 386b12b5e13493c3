"""Operations: Prometheus metrics and the access log (dispatcher observers), logging
set-up, and systemd integration (notify, watchdog, socket activation).

Leaf modules: they may import cruised.config and the dispatcher's record types,
nothing of the doors or the supervisor.
"""
