"""systemd's side of a unit, for tests: a NOTIFY_SOCKET listener."""

from __future__ import annotations

import socket
import threading


class NotifyListener:
    """What systemd would receive: every datagram on a NOTIFY_SOCKET, in order."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.messages.append(data.decode())

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()
