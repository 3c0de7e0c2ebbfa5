"""Shared fixtures: the real loopback server (from ``server_stub``'s pytest plugin)."""

pytest_plugins = ["server_stub.pytest_plugin"]
