"""Training stage: probe heads, losses and metrics over cached token maps."""
