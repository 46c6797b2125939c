"""One recipe per experiment: a frozen config and a `run(cfg)` that returns results."""
