"""The HTTP door: ``app`` (the aiohttp application, its routes and lifecycle),
``steps`` (access check, route, admit, submit, answer: shared by both paths),
``fast`` (the keep-alive fast path for plain endpoint calls).
"""
