"""Metrics, logs and the scalings log."""
