"""Datamodules, collators and the teacher top-k cache."""
