"""Adapters: LoRA and its initialisations (LoftQ)."""
