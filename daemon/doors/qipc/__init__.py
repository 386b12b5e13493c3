"""The kdb+ IPC door: ``door`` (listeners, connections, routing of q messages to
endpoints), ``wire`` (the kdb+ message header and handshake), ``auth`` (users
file and loopback trust), ``remote`` (pykx.remote sessions: Python source to run).
"""
