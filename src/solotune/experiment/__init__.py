"""Experiments over runs: the technique grid, its report, and the memory estimate."""
