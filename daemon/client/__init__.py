"""What a user imports: Session and @function, the connection and its frame reader,
the asyncio connection (aio.py), function shipping, the typed errors, where the daemon's sockets are, a small HTTP client.

Runs in scripts, REPLs and notebooks, far from the daemon: it may import
cruised.pool.wire (the frame format it speaks) and the standard library,
never cruised.core, cruised.doors or cruised.ops.
"""
