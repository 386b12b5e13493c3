"""Worker-side code: the template (forkserver), the worker loop, the wire format.

Nothing here imports the daemon side, so this package also runs under a
pool's own interpreter (a code env) with only the standard library and
cloudpickle (pure Python; the daemon puts its own copy on a code env's path:
daemon/core/codeenv.py). cloudpickle loads shipped functions and pickles by
value what the client's ``__main__`` defined (pool/wire/byvalue.py).
"""
