"""Train a small byte-level BPE tokenizer on a corpus (for the demo and for tests).

Byte-level BPE covers every string, so no example is ever lost to unknown characters, and the
offsets it returns are exact, which the assistant masks rely on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chattune.models.chatml import CHATML_TEMPLATE

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    special_tokens: Iterable[str] = CHATML_SPECIALS,
    chat_template: str | None = CHATML_TEMPLATE,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|pad|>",
    bos_token: str | None = None,
    save_to: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """A ChatML-ready tokenizer whose vocabulary fits the corpus; saved to `save_to` when given."""
    special_tokens = list(dict.fromkeys(special_tokens))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in special_tokens if t not in (eos_token, pad_token, bos_token)]}
    )
    tokenizer.chat_template = chat_template
    if save_to is not None:
        tokenizer.save_pretrained(str(save_to))
    return tokenizer
