"""Worker-side code: the template (forkserver), the worker loop, the wire format.

Nothing here imports the daemon side, so this package also runs under a
pool's own interpreter (a code env) with only the standard library and dill.
"""
