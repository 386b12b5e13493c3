"""Test support: the daemon harness, a kdb+ IPC test server, raw protocol clients, the invariant checker.

Imported as ``support.<module>`` by tests under unit/ and integration/
(pyproject.toml puts tests/ on the path). Nothing here is a test.
"""
