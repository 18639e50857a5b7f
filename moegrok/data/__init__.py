"""Inputs of a sweep: training-sample files (jsonl, Parquet) and their tokenization, the
checkpoint catalog (local dirs, hub revisions, fsspec URLs) and loading, and length-bucketed
batches.

Imports: the standard library, numpy/pandas/torch/transformers, and `moegrok.config`,
`moegrok.errors`, `moegrok.store`. Nothing else of moegrok.
"""
