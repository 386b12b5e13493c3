"""Shipped functions' code: one pool's registered DEFINE frames, and which of them each worker has.

A client registers a function once (a REGISTER frame, or the source of a
pykx.remote call: daemon/doors/qipc/remote.py): its DEFINE frame is kept here
under its key. A call names only the key. The first time a worker runs a key,
the DEFINE frame goes right before the call on its channel and the worker
caches the function (pool/worker.py FUNCTION_CACHE); ``Worker.known`` is the
supervisor's mirror of that cache, so the frame crosses each channel once.

Both are bounded: a pool's frames by their total size (``CODE_CACHE_BYTES``,
least recently registered first), a worker's mirror by count
(``KNOWN_PER_WORKER``, the size of the worker's own cache, least recently used
first). Forgetting is always safe: a key the pool lost is refused with
UNKNOWN_FUNCTION and the client registers again; a worker that lost a key the
mirror still lists answers UNKNOWN_FUNCTION, and the mirror drops it (``forget``).

The dispatcher owns one CodeCache per pool and does the answering; this module
only keeps bytes and keys.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

#: supervisor-side mirror of the worker's function cache (pool/worker.py FUNCTION_CACHE)
KNOWN_PER_WORKER = 4096
#: registered code kept per pool; a miss only makes the client register again
CODE_CACHE_BYTES = 256 << 20


class CodeCache:
    """One pool's registered functions: key -> DEFINE frame, bounded by ``CODE_CACHE_BYTES``."""

    __slots__ = ("frames", "nbytes")

    def __init__(self) -> None:
        #: key -> DEFINE frame (immutable once registered), least recently registered first. The
        #: dict is never replaced: the dispatcher binds it once for its per-call membership test.
        self.frames: OrderedDict[bytes, bytearray] = OrderedDict()
        self.nbytes = 0

    def register(self, key: bytes, define_frame: bytearray) -> None:
        """Keep a function's DEFINE frame (immutable from here on) for workers that lack it."""
        frames = self.frames
        if key in frames:
            frames.move_to_end(key)
            return
        frames[key] = define_frame
        self.nbytes += len(define_frame)
        # the newest frame always stays, however large: its client is about to call it
        while self.nbytes > CODE_CACHE_BYTES and len(frames) > 1:
            _, old = frames.popitem(last=False)
            self.nbytes -= len(old)

    def carry_over(self, other: CodeCache) -> None:
        """Register everything ``other`` holds, oldest first (a reload's new pool takes over the old one's)."""
        for key, frame in other.frames.items():
            self.register(key, frame)

    def parts_for(self, known: OrderedDict[bytes, None], key: bytes) -> list[Any] | None:
        """What a worker whose mirror is ``known`` must get before a call of ``key``.

        ``[]`` if it has the code, ``[DEFINE frame]`` the first time (``known``
        then lists the key), None if the pool no longer has the code. A fresh
        list: the caller appends the call's own frames to it.
        """
        if key in known:
            known.move_to_end(key)
            return []
        code = self.frames.get(key)
        if code is None:
            return None
        known[key] = None
        if len(known) > KNOWN_PER_WORKER:
            known.popitem(last=False)
        return [code]

    @staticmethod
    def forget(known: OrderedDict[bytes, None], key: bytes) -> None:
        """The worker answered UNKNOWN_FUNCTION for ``key``: it lacks the code, so the next call sends it again."""
        known.pop(key, None)
