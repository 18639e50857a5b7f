"""Per-sample and per-group metrics from routing tables: pathways and their distances and
consistency, compact tables, the embedding progress measure (MED), memorization rules, the
declared direction and monitor/retrospective status of every metric, the per-sample series the
contrast resamples, and live metrics during training.

All pure functions of tables and arrays. Imports: `moegrok.routing`, `moegrok.data` and the
top-level modules.
"""
