"""Data: reading datasets, the one registry of row formats, assistant-only label masks, tokenization."""
