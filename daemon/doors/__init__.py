"""Front doors: bytes from clients into Jobs, answers back into bytes.

``native`` (the framed protocol on a Unix socket), ``http/`` (endpoint calls,
status, probes) and ``qipc/`` (kdb+ IPC: endpoint calls and pykx.remote).
Each sees the daemon only through ``host.DoorHost``; ``sockets`` holds what all of
them need from the OS. May import cruised.core.dispatch (Job, sinks),
cruised.core.channel, cruised.config and cruised.pool.wire; never the supervisor.
"""
