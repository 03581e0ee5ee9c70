"""One module per CLI command that is not a Hydra pipeline."""
