"""Reference collection server for the ``telemetry`` client."""
