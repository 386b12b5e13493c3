"""cruised's benchmark suite against its peers: ``python -m bench [--quick]`` (bench/run.py)."""
