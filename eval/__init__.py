"""Evaluation: coherence, VQA retention, speed, reports."""
