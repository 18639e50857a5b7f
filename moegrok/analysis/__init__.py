"""What the metrics say about generalization: accuracy onsets and correlations against the trivial
baselines, the between-group contrast, the causal detector and its calibration.

Reads stored tables only. Imports: `moegrok.metrics`, `moegrok.data` and the top-level modules.
"""
