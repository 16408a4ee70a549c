"""assess: per-trace signals and health flags, user probes."""
