"""Thin entry points, one per verb: `python -m jobs.<verb> ...`."""
