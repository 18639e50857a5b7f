"""The multi-zoo study: toy zoos trained and swept end to end, then the contrast and the detector
calibrated on some zoos and evaluated on the others, against trivial baselines.

Imports anything below it: `moegrok.pipeline`, `moegrok.report`, `moegrok.analysis`,
`moegrok.metrics`, `moegrok.toy` and the top-level modules.
"""
