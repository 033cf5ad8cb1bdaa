"""Distillation: teacher targets, vocab-parallel divergences and the loss."""
