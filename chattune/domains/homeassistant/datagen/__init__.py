"""Home Assistant dataset generator: piles of phrasings in, chat-format JSONL out (see data/README.md)."""

from chattune.domains.homeassistant.datagen.errors import DataGenError, PileError
from chattune.domains.homeassistant.datagen.pipeline import GenerateConfig, GenerateResult, generate

__all__ = ["DataGenError", "GenerateConfig", "GenerateResult", "PileError", "generate"]
