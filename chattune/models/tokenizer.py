"""Loading a tokenizer, and its set-up: extra tokens (pad, ChatML, tool calls), the chat template, embedding resizing,
stop tokens."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from chattune.errors import ChattuneError
from chattune.models.chatml import CHATML_TEMPLATE, CHATML_TOKENS
from chattune.models.errors import ModelError
from chattune.models.gguf import find_gguf, gguf_tokenizer

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
EMBEDDING_MULTIPLE = 32  # tensor-core friendly row count for resized embeddings

TOKENIZER_HINT = "a model folder holds its tokenizer files; train.py saves them beside every model and adapter"
NO_TEMPLATE_HELP = (
    "the tokenizer of {model} has no chat template. Either pass --add_chatml_tokens (adds <|im_start|>/"
    "<|im_end|> and a ChatML template, the usual choice for base models) or --prompt_template_file FILE "
    "(a Jinja chat template of your own)."
)


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of a model folder, adapter folder, hub id or GGUF file (chattune.models.gguf), for every
    command; one that cannot be loaded is a one-line error naming the model."""
    from transformers import AutoTokenizer  # here: the commands' --help answers without transformers

    gguf_file = find_gguf(name_or_path)
    try:
        if gguf_file is not None:
            return gguf_tokenizer(gguf_file)
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except ChattuneError:
        raise
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())  # transformers' messages run over several lines
        raise ModelError(f"{name_or_path}: no usable tokenizer ({TOKENIZER_HINT}): {reason}") from None


def add_tokens(
    tokenizer: Any,
    *,
    pad: bool = False,
    chatml: bool = False,
    tool_calls: bool = False,
    template_file: str | None = None,
) -> list[str]:
    """Add the requested tokens and set the chat template; returns the tokens that were new."""
    before = len(tokenizer)
    added: list[str] = []
    if pad:
        if PAD_TOKEN not in tokenizer.get_vocab():
            added.append(PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if chatml:
        added += _add(tokenizer, CHATML_TOKENS, special=True)
    if tool_calls:
        # Not special: tool-call markers must survive `decode(skip_special_tokens=True)`.
        added += _add(tokenizer, TOOL_CALL_TOKENS, special=False)
    if template_file:
        tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
    elif chatml and not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        # Padding-free batches never use it, but batched generation and padded eval do.
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > before:
        logger.info("added %d token(s): %s", len(tokenizer) - before, ", ".join(added))
    return added


def _add(tokenizer: Any, tokens: tuple[str, ...], special: bool) -> list[str]:
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=special, normalized=False) for t in new], special_tokens=special)
    return new


def resize_embeddings(model: Any, tokenizer: Any) -> bool:
    """Grow the embedding matrices when the tokenizer outgrew them; True when rows were added."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    new_rows = math.ceil(len(tokenizer) / EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    model.resize_token_embeddings(new_rows, mean_resizing=True)
    logger.info("resized embeddings from %d to %d rows", rows, new_rows)
    return True


def set_stop_tokens(model: Any, tokenizer: Any, end_of_turn: str | None) -> None:
    """Make `generate` stop at the chat template's end-of-turn token as well as at EOS."""
    ids = [tokenizer.eos_token_id]
    if end_of_turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    ids = [i for i in dict.fromkeys(ids) if i is not None]
    if ids:
        model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
