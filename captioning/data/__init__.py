"""Datasets, tokenizer, vocabulary and the Lightning data module (no model code here)."""
