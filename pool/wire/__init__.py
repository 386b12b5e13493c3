"""The wire between client, supervisor and worker: ``frames`` (the framed protocol),
``framebuf`` (the one frame reader all three use), ``bundle`` (a call's pickle
streams), ``byvalue`` (pickling by value what the far side cannot import:
cloudpickle), ``sharedfile`` (memfd payloads), ``rawbuf`` (uninitialised buffers),
``sockopt`` (socket buffer sizes).

Standard library only, but for ``byvalue`` (cloudpickle), which is imported only
where something is pickled by value, never by the supervisor: it runs in the
client, the supervisor and a worker under a code env's interpreter.
"""
