"""Contract suites: one per extension point, run against every backend in backends.BACKENDS."""
