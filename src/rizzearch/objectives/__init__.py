"""Objectives: pure functions over logits / log-probs and targets returning ``(loss, metrics)``."""
