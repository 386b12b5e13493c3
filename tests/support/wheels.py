"""Tiny wheels and a package index for code env tests, with the standard library only (no network).

``make_wheel`` writes a pure-Python wheel (a zip: the package, ``METADATA``,
``WHEEL`` and ``RECORD``), so a test builds ``verpkg`` 1.0 and 2.0 into a
wheelhouse and a code env installs one of them with ``--no-index
--find-links DIR``. ``HeldIndex`` serves such a wheelhouse as a PEP 503
"simple" index on 127.0.0.1 and answers nothing until ``release()``: a build
that uses it stays in progress for as long as the test wants, to watch it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.server
import os
import threading
import zipfile
from pathlib import Path
from types import TracebackType

VERSION_CODE = "__version__ = {version!r}\n"


def make_wheel(where: Path, name: str, version: str, files: dict[str, str] | None = None) -> Path:
    """``<name>-<version>-py3-none-any.whl`` in ``where``: a package ``name`` whose ``__version__`` is ``version``."""
    dist = f"{name}-{version}.dist-info"
    entries = {f"{name}/__init__.py": VERSION_CODE.format(version=version)}
    entries.update(files or {})
    entries[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: a test package\n"
    entries[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: cruised-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in entries.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    entries[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    where.mkdir(parents=True, exist_ok=True)
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in entries.items():
            zf.writestr(path, text)
    return wheel


def wheelhouse(where: Path, name: str = "verpkg", versions: tuple[str, ...] = ("1.0", "2.0")) -> Path:
    """A directory holding ``name`` at each of ``versions``."""
    for version in versions:
        make_wheel(where, name, version)
    return where


class HeldIndex:
    """A PEP 503 index of a wheelhouse on 127.0.0.1 that holds every request until ``release()``."""

    def __init__(self, wheels: Path, hold_for: float = 120.0) -> None:
        self.wheels = wheels
        self.released = threading.Event()
        self.requests = 0
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            head = False

            def do_HEAD(self) -> None:  # uv asks first whether a file serves byte ranges
                self.head = True
                self.do_GET()

            def do_GET(self) -> None:
                index.requests += 1
                index.released.wait(hold_for)
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 2 and parts[0] == "simple":
                    links = "".join(
                        f'<a href="/files/{html.escape(f.name)}#sha256={hashlib.sha256(f.read_bytes()).hexdigest()}">{html.escape(f.name)}</a>\n'
                        for f in sorted(index.wheels.glob(f"{parts[1].replace('-', '_')}-*.whl"))
                    )
                    self._send(200, f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode(), "text/html")
                elif len(parts) == 2 and parts[0] == "files" and (index.wheels / parts[1]).is_file():
                    self._send(200, (index.wheels / parts[1]).read_bytes(), "application/octet-stream")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not self.head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a builder killed mid-request (the shutdown test): not the test's concern

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> HeldIndex:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def builder_processes(marker: str) -> list[str]:
    """Live processes whose command line mentions ``marker`` (an env directory): builders left behind."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            out.append(f"{entry}: {cmdline[:200]}")
    return out
