"""Constrained decoding in transformers: each prompt's GBNF grammar (from its task) masks the logits.

The grammar engine is llguidance, the engine behind llama.cpp's optional `LLAMA_LLGUIDANCE` backend: it reads
the same GBNF text llama.cpp does (converted to its Lark dialect), needs nothing but its own wheel, and computes a
49k-token mask in well under a millisecond on a CPU core (docs/evaluation.md, "Constrained decoding"). A `.gguf`
run in llama.cpp uses llama.cpp's own GBNF sampler instead (chattune.evaluation.llama_cpp): the runtime it ships to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import LogitsProcessor

from chattune.evaluation.inputs import EvalError

logger = logging.getLogger("chattune.evaluate")

INSTALL_HINT = "pip install llguidance"


def require_llguidance() -> Any:
    """The llguidance module, or a one-line error naming the package (checked before any model loads)."""
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        raise EvalError(
            f"--constrain needs the grammar engine llguidance, which is not installed: {INSTALL_HINT}"
        ) from None
    return llguidance


class GrammarCompiler:
    """Compiles GBNF texts for one tokenizer and vocabulary size; identical grammars compile once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        llguidance = require_llguidance()
        self.llguidance = llguidance
        # The stop tokens are the grammar's end: a reply may stop only where the grammar accepts.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids))
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self._compiled: dict[str, str] = {}

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for `grammar` (GBNF); an invalid grammar is an error naming its first problem."""
        if grammar not in self._compiled:
            try:
                self._compiled[grammar] = self.llguidance.grammar_from("gbnf", grammar)
            except ValueError as error:
                raise EvalError(f"the task's grammar does not compile: {error}") from None
        matcher = self.llguidance.LLMatcher(self.tokenizer, self._compiled[grammar])
        if matcher.is_error():
            raise EvalError(f"the task's grammar does not compile: {matcher.get_error()}")
        return matcher


class GrammarLogitsProcessor(LogitsProcessor):
    """A transformers logits processor for a batch whose rows each follow their own grammar (None: free).

    transformers calls it once per new token with the ids so far; the token chosen at the previous call is fed to
    that row's matcher first. A row whose matcher has stopped (it took a stop token) is left alone: generate()
    pads it from then on. One instance serves one generate() call.
    """

    def __init__(self, matchers: Sequence[Any | None], stop_ids: Sequence[int]) -> None:
        import llguidance.torch  # fill_next_token_bitmask writes a row in place; nothing here is compiled

        self.matchers = list(matchers)
        self.stop_ids = list(stop_ids)
        self.torch_helpers = llguidance.torch
        self.started = False
        self.bitmask: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        helpers = self.torch_helpers
        if self.bitmask is None:
            self.bitmask = helpers.allocate_token_bitmask(len(self.matchers), scores.shape[-1])
            self.stops_only = stop_bitmask(self.stop_ids, self.bitmask.shape[1])
        for row, matcher in enumerate(self.matchers):
            if matcher is None or matcher.is_stopped():
                continue
            if self.started and not matcher.consume_token(int(input_ids[row, -1])):
                raise RuntimeError(f"grammar rejected token {int(input_ids[row, -1])}: {matcher.get_error()}")
        self.started = True
        self.bitmask.fill_(-1)  # every token allowed, for free rows
        for row, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            if matcher.is_stopped():  # the grammar is complete: the reply may only end (generate() pads after it)
                self.bitmask[row] = self.stops_only
            else:
                helpers.fill_next_token_bitmask(matcher, self.bitmask, row)
        return apply_bitmask(scores, self.bitmask)


def stop_bitmask(stop_ids: Sequence[int], words: int) -> Any:
    """One bitmask row that allows only the stop tokens."""
    import torch

    row = torch.zeros(words, dtype=torch.int64)
    for token in stop_ids:
        row[token // 32] |= 1 << (token % 32)
    return row.to(torch.int32)  # bit 31 wraps to the sign bit, as the int32 words llguidance writes


def apply_bitmask(scores: Any, bitmask: Any) -> Any:
    """Forbidden tokens' logits to -inf; bit j of word i of a row allows token 32 * i + j.

    Plain tensor ops: llguidance's own helper is a torch.compile kernel, which would compile on first use (and
    needs a C++ compiler on a CPU host)."""
    import torch

    bits = torch.arange(32, dtype=torch.int32, device=scores.device)
    words = bitmask.to(scores.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().view(words.shape[0], -1)[:, : scores.shape[-1]]
    return scores.masked_fill(~allowed, float("-inf"))
