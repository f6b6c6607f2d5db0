"""Home Assistant dataset generator: piles of phrasings in, chat-format JSONL out (see data/README.md)."""

from chattune.datagen.errors import DataGenError, PileError
from chattune.datagen.pipeline import GenerateConfig, GenerateResult, generate

__all__ = ["DataGenError", "GenerateConfig", "GenerateResult", "PileError", "generate"]
