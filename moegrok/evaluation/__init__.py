"""Downstream accuracy of a checkpoint: benchmark items (moegrok jsonl, lm-eval task YAMLs), the
engines that score them (vLLM, plain HF), moegrok's and lm-eval's scoring rules, the code sandbox,
and the optional LoRA tuning before evaluation.

Imports: `moegrok.data` and the top-level modules.
"""
