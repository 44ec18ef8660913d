"""Infrastructure with no feature of its own: database, off-loop pools, logs, metrics, limits, clock."""
