"""Helpers shared by tests/ and bench/: real processes (redis-server) and model folders built on the fly."""
