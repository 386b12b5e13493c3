"""The ``cruised`` command: ``serve``, ``status``, ``reload``, ``call``, ``endpoints`` and friends.

``main`` parses the command line and either runs the daemon (cruised.core) or
talks to one as a client (cruised.client). May import every other package.
"""

from cruised.cli.main import main

__all__ = ["main"]
