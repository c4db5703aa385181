"""Comparison: the sides (dense, greedy, learned, baselines), the held-out stage that measures them all
in the same interleaved rounds, the report built as data then rendered, and the export rules."""
