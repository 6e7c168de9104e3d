"""Evaluation helpers: deterministic analysis of generated images."""
