"""Structured pruning: importance from a calibration pass, then slicing a smaller config."""
