"""Socket buffer sizing shared by every end of cruised's channels (client, supervisor, worker).

A Unix stream socket's send buffer bounds how many bytes are in flight
between two processes (default ~208 KiB here). A 1 MiB argument then crosses
each hop in five chunks, each a wake-up of the reader and, in the supervisor,
a loop iteration. A larger limit lets a whole frame of a few MiB go in one
write; the kernel charges memory only for bytes actually queued, and caps the
request at ``net.core.wmem_max``.
"""

from __future__ import annotations

import socket

SEND_BUFFER = 4 << 20


def size_buffers(sock: socket.socket) -> None:
    """Ask for ``SEND_BUFFER`` bytes of send and receive buffer; keep the defaults if refused."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SEND_BUFFER)
        except OSError:
            pass
