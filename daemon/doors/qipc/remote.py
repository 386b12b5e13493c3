r"""Unmodified pykx.remote sessions: the exact messages pykx sends, recognised without running q.

A ``pykx.remote.session`` expects a q process with pykx.q loaded. It sends
q text, never a q function, so the door recognises each message by its text,
compared with every whitespace run (and every ``\n`` escape) removed, against
the templates below, copied from pykx's ``remote.py``:

=================  ==========================================================
pykx version       message -> what the door does
=================  ==========================================================
2.x, 3.x, 4.x      ```pykx in key ``` (the probe) -> ``1b``: pykx is "loaded"
2.x, 3.x, 4.x      ``@[system"l ",;"pykx.q";...]`` (load it) -> ``::``
3.x, 4.x           ``({[alias;library] ... "import ",library," as ",alias ...};
                   `alias; `module)`` (``session.libraries``) -> the module is
                   imported in a worker of ``qipc.remote_pool`` (CHECK); on
                   success ``::`` and the connection remembers it, else pykx.q's
                   own error text ``Failed to load library '...' with alias ...``
2.x                ``({x:string x; @[.pykx.pyexec;"import ",x; ...]}; `module)``,
                   sent before every call -> as above, ``import module``
3.x, 4.x           ``({[code;func_name;args;lenargs] .pykx.pyexec trim ...};
                   source; `name; args; count)`` -> the function runs in the pool
2.x                ``({.pykx.pyexec "\n" sv 1_"\n" vs x; .pykx.get[y;<] . z};
                   source; `name; args)`` -> as above
=================  ==========================================================

A function is compiled once per worker and cached under a key: a hash of
its source, its name and the libraries its connection added (they are
imported into its namespace). The door keeps the DEFINE frame in the pool's
code cache (``Dispatcher.register``), exactly as for natively shipped
functions, so a worker gets the source only the first time it runs it.
Unlike pykx.q, the source is not re-executed on every call and functions of
different clients never share a namespace.
"""

from __future__ import annotations

import hashlib
import json
import re

from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind

_SQUASH = re.compile(r"\s+|\\n")


def squash(text: str) -> str:
    """Whitespace-insensitive form used for matching (``"\n"`` escapes count as whitespace)."""
    return _SQUASH.sub("", text)


PROBE = squash("`pykx in key `")
_LOAD = re.compile(r'@\[system"l",;"pykx\.q";\{\'"FailedtoloadPyKXwitherror:",x\}\]|@\[system"l",;"pykx\.q";\{\'"FailedtoloadKDB-XPythonwitherror:",x\}\]')

LIBRARY_3 = squash(
    """{[alias;library]
      alias:string alias;
      library:string library;
      @[.pykx.pyexec;
        "import ",library," as ",alias;
        {'"Failed to load library '",x,
          "' with alias '",y,"' with error: ",z}[library;alias]
        ]}"""
)
LIBRARY_2 = squash("""{x:string x;  @[.pykx.pyexec;"import ",x;{'"Failed to load package: ",x," with: ",y}[x]]}""")
CALL_3 = squash(
    """{[code;func_name;args;lenargs]
      .pykx.pyexec trim "\n" sv 1_"\n" vs code;
      func:.pykx.get[func_name;<];
      $[lenargs;func . args;func[]]
      }"""
)
CALL_2 = squash("""{.pykx.pyexec "\n" sv 1_"\n" vs x; .pykx.get[y;<] . z}""")

LAMBDAS = {LIBRARY_3: "library", LIBRARY_2: "library2", CALL_3: "call", CALL_2: "call2"}


def classify_text(text: str) -> str | None:
    """A one-string message: ``probe``, ``load`` (load pykx.q) or None."""
    s = squash(text)
    if s == PROBE:
        return "probe"
    if _LOAD.fullmatch(s):
        return "load"
    return None


def classify_lambda(text: str) -> str | None:
    """The head of a general list: ``library``, ``library2``, ``call``, ``call2`` or None."""
    if not text.lstrip().startswith("{"):
        return None
    return LAMBDAS.get(squash(text))


def library_error(kind: str, alias: str, module: str, message: str) -> str:
    """The text pykx.q's lambda signals when the import fails (the client shows it as QError)."""
    if kind == "library2":
        return f"Failed to load package: {module} with: {message}"
    return f"Failed to load library '{module}' with alias '{alias}' with error: {message}"


def function_key(source: bytes, name: str, libraries: dict[str, str]) -> bytes:
    h = hashlib.blake2b(source, digest_size=frames.KEY_SIZE, person=b"cruised-pykxrem")
    h.update(b"\0" + name.encode() + b"\0")
    h.update(json.dumps(sorted(libraries.items())).encode())
    return h.digest()


def define_frame(pool: str, key: bytes, name: str, source: bytes, libraries: dict[str, str]) -> bytearray:
    """The DEFINE frame a worker loads the function from (pool/qcall.py ``load_source``)."""
    meta = json.dumps({"source": True, "name": name, "libraries": libraries}).encode()
    return bytearray(frames.frame(Kind.DEFINE, 0, frames.register_head(pool, key, meta) + source))
