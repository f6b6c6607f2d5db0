"""Data: reading datasets, the tokenizer and its chat template, assistant-only label masks, tokenization."""
