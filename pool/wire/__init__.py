"""The wire between client, supervisor and worker: ``frames`` (the framed protocol),
``framebuf`` (the one frame reader all three use), ``bundle`` (a call's pickle
streams), ``sharedfile`` (memfd payloads), ``rawbuf`` (uninitialised buffers),
``sockopt`` (socket buffer sizes).

Standard library only: it runs in the client, the supervisor and a worker
under a code env's interpreter.
"""
