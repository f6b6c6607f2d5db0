"""Scoring a GGUF file in llama.cpp, the runtime it ships to, through llama-cpp-python.

The accuracy that counts for a home-llm user is that of the quantized file in llama.cpp, not that of the
checkpoint it came from. `LlamaCppModel` runs the file with the same prompts (rendered with the chat template
stored in the GGUF), greedy decoding and the same stop tokens as the transformers path, so the two paths fill
the same metrics. Prompts are tokenized by llama.cpp itself, as llama-server would; where its ids differ from
the Hugging Face tokenizer's, that is counted (`tokenization_mismatches`), since it is a bug of the file.

Perplexity is the likelihood of the reference ids the Hugging Face tokenizer gives (the transformers path's
ids), so that HF and GGUF perplexities compare the same token sequences.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from chattune.data.masking import IGNORE_INDEX
from chattune.evaluation.inputs import EvalError

logger = logging.getLogger("chattune.evaluate")

INSTALL_HINT = (
    "`pip install llama-cpp-python` (it compiles llama.cpp: about 5 minutes on 2 cores; "
    'CMAKE_ARGS="-DGGML_CUDA=on" for a GPU build)'
)

# A CPU build for this machine without the AMX backend (see _without_amx_repacking).
NO_AMX_CMAKE_ARGS = "-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(what: str) -> Any:
    """The llama_cpp module, or an error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise EvalError(f"{what} needs llama-cpp-python, which is not installed: {INSTALL_HINT}") from None
    return llama_cpp


def load_llama(path: str | os.PathLike, **options: Any) -> Any:
    """`llama_cpp.Llama` for the file at `path`, quiet, on every core this process may use, and safe from the
    AMX backend's crash (see _without_amx_repacking). `options` go to `Llama` as they are."""
    llama_cpp = require_llama_cpp(f"running {path} in llama.cpp")
    options = {"n_threads": len(os.sched_getaffinity(0)), "verbose": False, **options}
    with _without_amx_repacking(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), **options)


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, with what evaluation needs: greedy replies and reference likelihoods."""

    def __init__(self, path: Path, tokenizer: Any, device: str = "cpu") -> None:
        from chattune.models.gguf import read_architecture

        self.llama_cpp = require_llama_cpp(f"scoring {path} in llama.cpp")
        read_architecture(path)  # a file that is not GGUF, or is cut short, fails here with its name
        self.path = path
        self.tokenizer = tokenizer
        self.device = device
        self.llm: Any = None
        self.n_ctx = 0
        self.stop_ids: list[int] = []
        self.tokenization_mismatches = 0

    def open(self, n_ctx: int) -> None:
        """Load the file with a context of at least `n_ctx` tokens (sized to the test set, since logits for
        every position of the context are kept: n_ctx x vocabulary floats)."""
        if self.llm is not None and self.n_ctx >= n_ctx:
            return
        self.close()
        try:
            # logits_all keeps every position's logits, which the reference likelihood reads.
            self.llm = load_llama(
                self.path,
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_gpu_layers=-1 if self.device == "cuda" else 0,
                logits_all=True,
            )
        except (ValueError, RuntimeError) as error:
            raise EvalError(f"{self.path}: llama.cpp cannot load it, truncated or corrupt? ({error})") from None
        self.n_ctx = n_ctx
        self.stop_ids = self._stop_ids(self.tokenizer)

    def _stop_ids(self, tokenizer: Any) -> list[int]:
        """The file's EOS and end-of-turn ids, plus the tokens the HF path stops on (chat template's end of turn)."""
        from chattune.data.masking import ChatMasker

        ids = [self.llm.token_eos()]
        eot = self.llm.metadata.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            ids.append(int(eot))
        ids.append(tokenizer.eos_token_id)
        try:
            end_of_turn = ChatMasker(tokenizer).end_of_turn_token()
        except Exception:  # an unusual template only loses the extra stop token, as on the HF path
            end_of_turn = None
        if end_of_turn is not None:
            ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
        return [int(i) for i in dict.fromkeys(ids) if i is not None and i >= 0]

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate_replies(
        self,
        texts: Sequence[str],
        hf_prompts: Sequence[list[int]],
        max_new_tokens: int,
        continuations: Sequence[tuple[list[int], list[int]] | None] | None = None,
        seconds: list[float | None] | None = None,
        progress: bool = True,
        grammars: Sequence[str | None] | None = None,
    ) -> tuple[list[str], list[tuple[float, int] | None]]:
        """Greedy replies to the rendered prompts `texts`, one at a time, and the reference NLL of each example
        with a continuation (scored on `hf_prompts` + continuation, in the same pass the reply starts from).
        `grammars` holds a GBNF grammar per prompt (None: free), applied by llama.cpp's own grammar sampler, as
        llama-server's `--grammar-file` would."""
        from tqdm import tqdm

        self.open(context_size(hf_prompts, continuations, max_new_tokens))
        replies: list[str] = []
        nlls: list[tuple[float, int] | None] = []
        if seconds is not None:
            seconds.clear()
        bar = tqdm(texts, desc="llama.cpp", unit="prompt", file=sys.stderr, disable=not progress)
        for index, text in enumerate(bar):
            started = time.perf_counter()
            prompt = self.tokenize(text)
            if prompt != list(hf_prompts[index]):
                self.tokenization_mismatches += 1
            continuation = continuations[index] if continuations else None
            nlls.append(self.reference_nll(hf_prompts[index], continuation) if continuation else None)
            grammar = grammars[index] if grammars else None
            replies.append(self._greedy_reply(prompt, max_new_tokens, grammar))
            if seconds is not None:
                seconds.append(time.perf_counter() - started)
        if self.tokenization_mismatches:
            logger.warning(
                "%s: llama.cpp tokenized %d of %d prompts differently from the Hugging Face tokenizer",
                self.path,
                self.tokenization_mismatches,
                len(texts),
            )
        return replies, nlls

    def _greedy_reply(self, prompt: list[int], max_new_tokens: int, grammar: str | None = None) -> str:
        self._check_fits(len(prompt) + max_new_tokens)
        stops = set(self.stop_ids)
        new_ids: list[int] = []
        if grammar is None:
            # temp 0 is llama.cpp's greedy sampler; repeat_penalty 1 turns the penalty off, as in HF greedy decoding.
            tokens = self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True)
        else:
            tokens = self._constrained_tokens(prompt, grammar)
        for token in tokens:
            if token in stops:
                break
            new_ids.append(token)
            if len(new_ids) >= max_new_tokens:
                break
        # special=False: control tokens are not printed, as the HF path decodes with skip_special_tokens.
        return self.llm.detokenize(new_ids, special=False).decode("utf-8", errors="replace").strip()

    def _constrained_tokens(self, prompt: list[int], grammar: str) -> Iterator[int]:
        """Greedy tokens under llama.cpp's GBNF sampler, evaluated one at a time from the kept prompt cache."""
        sampler = GrammarSampler(self.llama_cpp, self.llm, grammar)
        try:
            kept = _common_prefix(self.llm.input_ids[: self.llm.n_tokens].tolist(), prompt)
            self.llm.n_tokens = min(kept, len(prompt) - 1)
            self.llm.eval(prompt[self.llm.n_tokens :])
            while True:
                token = sampler.choose(self.llm.scores[self.llm.n_tokens - 1])
                yield token
                self.llm.eval([token])
        finally:
            sampler.close()

    def reference_nll(self, prompt: Sequence[int], continuation: tuple[list[int], list[int]]) -> tuple[float, int]:
        """Summed NLL and count of the labelled continuation tokens after `prompt`, from llama.cpp's logits."""
        import numpy as np

        tokens, labels = continuation
        full = [*prompt, *tokens]
        self._check_fits(len(full))
        # Positions already in llama.cpp's cache from the previous example (the shared system prompt) are kept.
        kept = _common_prefix(self.llm.input_ids.tolist(), full)
        self.llm.n_tokens = min(kept, len(full) - 1)
        self.llm.eval(full[self.llm.n_tokens :])
        start = len(prompt) - 1  # the logits at position p predict token p + 1
        logits = np.asarray(self.llm.scores[start : start + len(tokens)], dtype=np.float64)
        log_probs = logits - _logsumexp(logits)
        targets = np.asarray(labels)
        counted = targets != IGNORE_INDEX
        picked = log_probs[np.arange(len(tokens))[counted], targets[counted]]
        return float(-picked.sum()), int(counted.sum())

    def _check_fits(self, length: int) -> None:
        if length > self.n_ctx:
            raise EvalError(f"{self.path}: a prompt of {length} tokens exceeds the context of {self.n_ctx}")

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class GrammarSampler:
    """llama.cpp's own GBNF sampler for one reply, asked as llama.cpp's CLI and server ask it: first about the
    greedy token alone, and about all 49k candidates only when the grammar refuses that one. The choice is the same
    as masking every candidate first (a token the grammar allows that is the best of all is the best of the allowed);
    the cost is one check per step instead of a whole vocabulary's (llama-cpp-python's sampler chain checks all)."""

    def __init__(self, llama_cpp: Any, llm: Any, grammar: str) -> None:
        from llama_cpp import _internals

        self.lib = llama_cpp
        self.handle = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
        if not self.handle:
            raise EvalError("llama.cpp cannot parse the task's grammar (its log above names the rule)")
        self.single = (llama_cpp.llama_token_data * 1)()
        self.every = _internals.LlamaTokenDataArray(n_vocab=llm.n_vocab())

    def choose(self, logits: Any) -> int:
        import math

        import numpy as np

        token = int(np.argmax(logits))
        self.single[0] = self.lib.llama_token_data(token, float(logits[token]), 0.0)
        one = self.lib.llama_token_data_array(data=self.single, size=1, selected=-1, sorted=False)
        self.lib.llama_sampler_apply(self.handle, ctypes.byref(one))
        if not math.isfinite(self.single[0].logit):  # refused: the best token the grammar allows
            self.every.copy_logits(np.asarray(logits, dtype=np.single))
            self.lib.llama_sampler_apply(self.handle, ctypes.byref(self.every.candidates))
            data = self.every.candidates_data
            token = int(data.id[int(np.argmax(data.logit[: self.every.candidates.size]))])
        self.lib.llama_sampler_accept(self.handle, token)
        return token

    def close(self) -> None:
        if self.handle:
            self.lib.llama_sampler_free(self.handle)
            self.handle = None


def built_with_amx(llama_cpp: Any) -> bool:
    """Whether this llama.cpp build holds the AMX backend (compiled on a CPU with AMX, with -march=native)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def _without_amx_repacking(llama_cpp: Any) -> Iterator[None]:
    """Load weights into plain CPU buffers when the build holds the AMX backend.

    llama.cpp's AMX backend repacks weights into its own buffer and can segfault in the first matrix
    multiplication after (llama.cpp issue #20824, seen here with 0.3.36 on a Sapphire Rapids CPU): a crash that
    takes the whole evaluation with it. The `Llama` class exposes no switch for it, so the model's default
    parameters are wrapped for the time of the load; the cost is speed only, and small at this model size.
    """
    if not built_with_amx(llama_cpp):
        yield
        return
    logger.warning(
        "this llama-cpp-python was built with llama.cpp's AMX backend, which can crash (llama.cpp #20824); "
        'weights are loaded without repacking. To build without it: CMAKE_ARGS="%s" pip install '
        "--no-cache-dir --force-reinstall llama-cpp-python",
        NO_AMX_CMAKE_ARGS,
    )
    module = llama_cpp.llama.llama_cpp  # the binding module the Llama class calls
    defaults = module.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        module.llama_model_default_params = defaults


def context_size(hf_prompts: Sequence[list[int]], continuations: Sequence[Any] | None, max_new_tokens: int) -> int:
    """The llama.cpp context the longest example needs (prompt plus reply or reference), rounded up to 256."""
    longest = 0
    for index, prompt in enumerate(hf_prompts):
        continuation = continuations[index] if continuations else None
        tail = max(max_new_tokens, len(continuation[0]) if continuation else 0)
        longest = max(longest, len(prompt) + tail)
    # Slack for llama.cpp tokenizing a prompt a few tokens longer than the HF tokenizer does.
    return (longest + 16 + 255) // 256 * 256


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _logsumexp(logits: Any) -> Any:
    import numpy as np

    top = logits.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
