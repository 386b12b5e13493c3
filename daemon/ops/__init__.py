"""Operations: Prometheus metrics and the access log (dispatcher observers), logging
set-up, systemd integration (notify, watchdog, socket activation), and the
minimal init that runs in front of the supervisor when it is a container's PID 1.

Leaf modules: they may import cruised.config and the dispatcher's record types,
nothing of the doors or the supervisor.
"""
