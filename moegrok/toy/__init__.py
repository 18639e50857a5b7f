"""The embedded default: a tiny OLMoE trained on multi-group modular arithmetic until it groks,
saved as ordinary HF checkpoints (data.py: the arithmetic groups and splits, tokenizer.py, model.py,
train.py: full-batch AdamW with resumable checkpoints; summary.py: when each group memorized and
generalized).

Imports: data, routing, metrics, analysis and the top-level modules.
"""
