"""The template process on its own: a supervisor that goes away while it starts is no error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys


def test_a_channel_closed_while_starting_ends_the_template_quietly() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cruised.pool.template", str(theirs.fileno())], pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True
    )
    theirs.close()
    ours.send(json.dumps({"libraries": {}}).encode())  # the spawn spec: nothing to preload
    ours.close()  # the supervisor stops before the template's hello
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
