"""The supervisor and what it owns: generations and reload, the per-pool dispatcher
(queue, worker table, deadlines), the launcher and its worker channels, code envs.

The single owner of request state. May import cruised.config, cruised.ops
(observers), cruised.pool.wire and, from the supervisor only, the doors it starts;
never cruised.client beyond its errors and default paths.
"""
