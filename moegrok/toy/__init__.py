"""The embedded default: a tiny OLMoE trained on multi-group modular arithmetic until it groks."""
