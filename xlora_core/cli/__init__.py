"""Command-line entry points (xlora-train, xlora-eval)."""
