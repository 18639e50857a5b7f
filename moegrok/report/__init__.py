"""HTML pages over stored tables (read-only: nothing is recomputed): the run report, the grid page,
the contrast section and the study page, with the shared page parts.

Imports: `moegrok.analysis`, `moegrok.metrics` and the top-level modules.
"""
