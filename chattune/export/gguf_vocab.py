"""The tokenizer part of a GGUF file: which of llama.cpp's tokenizers reproduces a Hugging Face tokenizer, and
its vocabulary in llama.cpp's terms. Used by `chattune.export.gguf`.

llama.cpp has its own implementation of each tokenizer family, so a tokenizer is written only when one of them
splits text as the Hugging Face tokenizer does; that is decided from the tokenizer's behaviour and its
vocabulary, and a tokenizer that no llama.cpp tokenizer reproduces is refused:

* byte-level BPE (GPT-2, Qwen2, Llama 3): `tokenizer.ggml.model = "gpt2"`, the merges, and the name of the
  text-splitting rule (`tokenizer.ggml.pre`), found by running each known rule on a probe text;
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral v1, Phi-3, Gemma: `▁` for spaces, `<0xNN>` byte
  tokens): `tokenizer.ggml.model = "llama"`, a score per token that orders the merges as the merge list does,
  and whether a `▁` is put before text (`tokenizer.ggml.add_space_prefix`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

import gguf

from chattune.errors import ChattuneError

logger = logging.getLogger(__name__)

SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space

# A text whose pre-tokenization tells the byte-level families apart: contractions in both cases (GPT-2
# matches them case-sensitively), long digit runs (Qwen2 splits digits one by one, Llama 3 in threes),
# runs of spaces and newlines, letters outside ASCII, and punctuation glued to words.
_PRE_TOKENIZER_PROBE = (
    "I'm sure we'LL see DON'T you'd 've 12345678 3.14159 x=1000000;\n\n\n  indented\tand\r\n"
    "   spaces   end  Grüße München ça 日本語のテキスト 🙂🙂 ```python\nprint('hi')``` ((a+b)) --flag !!!?"
)

# For SentencePiece-style tokenizers, which must not change text except for spelling spaces as "▁": runs of
# spaces, tabs, newlines, and characters that Unicode normalization would change (a ligature, a decomposed é,
# a full-width letter), which llama.cpp's SentencePiece tokenizer leaves as they are.
_SPM_PROBE = "Grüße  aus\tMünchen,\n\n   ça va? 日本語 ﬁne e\u0301 Ａ 🙂 end "

# Split patterns of the byte-level BPE families llama.cpp knows by name (the `tokenizer.ggml.pre` value).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# The added tokens that keep the spaces after them under llama.cpp's Phi-3 rule, and how it spots the rule.
_PHI3_KEEPS_SPACES = ("<unk>", "<s>", "<|endoftext|>")
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


class UnsupportedModelError(ChattuneError, ValueError):
    """The folder holds a model or tokenizer this exporter cannot write faithfully."""


@dataclass(frozen=True)
class TokenizerKind:
    """Which llama.cpp tokenizer reproduces a Hugging Face tokenizer, and its settings."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # tokenizer.ggml.pre: the byte-level split rule; "default" for "llama"
    add_space_prefix: bool = False  # "llama" only: whether llama.cpp writes a "▁" before text
    # Whether added tokens swallow the spaces after them as Phi-3's do; llama.cpp then needs "phi-3" in the
    # file's name, and must not find it there otherwise (see `_space_swallowing` and `file_name`).
    phi3_space_swallowing: bool = False


@dataclass
class Vocab:
    kind: TokenizerKind
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # "llama" only: llama.cpp merges the adjacent pair whose result scores highest
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad / eot
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


# --------------------------------------------------------------------------------------------------------------
# Which tokenizer


def tokenizer_kind(tokenizer: Any) -> TokenizerKind:
    """The llama.cpp tokenizer that splits text as `tokenizer` (a transformers fast tokenizer) does; refuses
    tokenizers that none of them reproduces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError("unsupported tokenizer: no fast (tokenizers) backend to read the vocabulary from")
    swallowing = _space_swallowing(tokenizer)
    if type(backend.model).__name__ == "BPE" and backend.model.byte_fallback:
        kind = _sentencepiece_kind(tokenizer, backend)
    else:
        kind = TokenizerKind("gpt2", _detect_pre_tokenizer(backend))
    return replace(kind, phi3_space_swallowing=swallowing)


def _space_swallowing(tokenizer: Any) -> bool:
    """Whether added tokens swallow the spaces after them (`rstrip`) in the one pattern llama.cpp reproduces.

    GGUF has no field for it: llama.cpp sets it by file name (llama-vocab.cpp), when `general.name` holds
    "phi3" or "phi-3": then every added token strips the spaces after it except `<unk>`, `<s>` and
    `<|endoftext|>`, and `</s>` does too. That is Phi-3's tokenizer; any other pattern (or `lstrip`,
    `single_word`) is refused, since llama.cpp would keep those spaces as tokens and the ids would differ.
    """
    added = list(tokenizer.added_tokens_decoder.values())
    if not any(token.lstrip or token.rstrip or token.single_word for token in added):
        return False
    contents = {token.content for token in added}
    stripping = {token.content for token in added if token.rstrip}
    phi3 = (contents - set(_PHI3_KEEPS_SPACES)) | {"</s>"}
    known = set(_PHI3_KEEPS_SPACES) | {"</s>"}
    if stripping == phi3 and known <= contents and not any(token.lstrip or token.single_word for token in added):
        return True
    # The tokens that break the pattern: the ones stripping on the left or around a word, else the difference.
    odd = sorted(t.content for t in added if t.lstrip or t.single_word) or sorted(stripping ^ phi3) or sorted(stripping)
    raise UnsupportedModelError(
        f"unsupported tokenizer: added tokens such as {', '.join(map(repr, odd[:4]))} strip the spaces beside "
        "them (lstrip/rstrip/single_word) in a way GGUF cannot store (only Phi-3's pattern is known to "
        "llama.cpp); llama.cpp would tokenize the text around them differently"
    )


def _detect_pre_tokenizer(backend: Any) -> str:
    """The `tokenizer.ggml.pre` name of a byte-level BPE tokenizer (a `tokenizers.Tokenizer`).

    Decided by behaviour, not by reading the JSON: the tokenizer's own pre-tokenizer and each known
    family's split a probe text, and the family that splits it identically is the answer.
    """
    from tokenizers import Regex, pre_tokenizers

    model_type = type(backend.model).__name__
    if model_type != "BPE" or backend.pre_tokenizer is None:
        raise UnsupportedModelError(
            "unsupported tokenizer: GGUF export handles BPE tokenizers only (byte-level ones as GPT-2, Qwen2 and "
            "Llama 3 have, and SentencePiece-style ones with byte fallback as Llama 2, Mistral and Gemma have), "
            f"this one is a {model_type} model" + ("" if backend.pre_tokenizer else " without a pre-tokenizer")
        )

    def byte_level_after(pattern: str) -> Any:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    candidates = {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        "qwen2": byte_level_after(_QWEN2_SPLIT),
        "llama-bpe": byte_level_after(_LLAMA3_SPLIT),
    }
    try:
        ours = backend.pre_tokenizer.pre_tokenize_str(_PRE_TOKENIZER_PROBE)
    except Exception as error:  # a pre-tokenizer kind that cannot run on its own
        raise UnsupportedModelError(f"unsupported tokenizer: its pre-tokenizer cannot be checked ({error})") from error
    for name, candidate in candidates.items():
        if candidate.pre_tokenize_str(_PRE_TOKENIZER_PROBE) == ours:
            return name
    raise UnsupportedModelError(
        "unsupported tokenizer: its pre-tokenizer splits text unlike any byte-level BPE family this exporter knows "
        f"({', '.join(candidates)})"
    )


def _sentencepiece_kind(tokenizer: Any, backend: Any) -> TokenizerKind:
    """A BPE tokenizer with byte fallback, accepted when llama.cpp's SentencePiece tokenizer splits text as it does.

    That tokenizer spells spaces as "▁", merges the whole text at once (no pre-tokenizer splitting it into
    words), merges by score, and falls back to `<0xNN>` tokens for characters it has no token for.
    """
    model = json.loads(backend.to_str())["model"]
    missing = [f"<0x{byte:02X}>" for byte in range(256) if f"<0x{byte:02X}>" not in model["vocab"]]
    if missing:
        raise UnsupportedModelError(
            f"unsupported tokenizer: a byte-fallback BPE without the byte tokens {', '.join(missing[:3])}, ...; "
            "llama.cpp's SentencePiece tokenizer needs all 256"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        raise UnsupportedModelError(
            "unsupported tokenizer: a byte-fallback BPE with a subword prefix, word suffix or ignore_merges, "
            "which llama.cpp's SentencePiece tokenizer does not have"
        )
    merge_scores(model, _added_contents(tokenizer))  # refuses merge lists that no score order reproduces
    at_start = _space_prefix_at_start(backend)
    after_special = _space_prefix_after_special(tokenizer, at_start)
    if at_start != after_special:
        # llama.cpp puts the "▁" before text at the start and after every special token, or nowhere. Chat text
        # starts with a special token (BOS or a turn marker), so what happens after one is what is kept.
        logger.info(
            "the tokenizer writes a leading '▁' at the start of a text but not after a special token; llama.cpp "
            "is set to match chat-formatted text, which starts with a special token"
        )
    return TokenizerKind("llama", "default", add_space_prefix=after_special)


def _added_contents(tokenizer: Any) -> set[str]:
    return {token.content for token in tokenizer.added_tokens_decoder.values()}


def _space_prefix_at_start(backend: Any) -> bool:
    """Whether the tokenizer writes a "▁" before text; refuses normalization beyond spelling spaces as "▁"."""
    text = _SPM_PROBE
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    spelled = _SPM_PROBE.replace(" ", SPACE)
    if pieces in ([spelled], [SPACE + spelled]):
        return pieces[0] != spelled
    raise UnsupportedModelError(
        "unsupported tokenizer: a SentencePiece-style tokenizer (BPE with byte fallback) whose normalizer or "
        "pre-tokenizer does more than spell spaces as '▁' (it splits words apart or normalizes Unicode), which "
        "llama.cpp's SentencePiece tokenizer does not do"
    )


def _space_prefix_after_special(tokenizer: Any, default: bool) -> bool:
    """Whether the tokenizer writes a "▁" before text that follows a special token, as in "<s>[INST]"."""
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    if not specials:
        return default
    pieces = tokenizer.tokenize(specials[0] + "x", add_special_tokens=False)
    return len(pieces) > 1 and pieces[1].startswith(SPACE)


def merge_scores(model: dict[str, Any], added: set[str]) -> dict[str, float]:
    """Scores under which llama.cpp's SentencePiece tokenizer merges as the BPE `model` (tokenizer.json's
    "model") does, for every token that a merge makes; refuses merge lists that no scores reproduce.

    The BPE applies the listed merge of lowest rank first, and only listed merges. llama.cpp merges any two
    adjacent pieces that form a token, best score first. They agree when every way of cutting a token into
    two pieces is a listed merge, and the merges making one token are listed together, so that one score per
    token orders them: its first merge's rank, negated. Tokenizers converted from SentencePiece are so.
    Added tokens (`added`) are matched whole before any merging, by both, and are left out.
    """
    vocab: dict[str, int] = model["vocab"]
    scores: dict[str, float] = {}
    listed: set[tuple[str, str]] = set()
    previous = None
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        listed.add((left, right))
        token = left + right
        if token != previous and token in scores:
            raise UnsupportedModelError(
                f"unsupported tokenizer: the merges making {token!r} are not listed together, so no score per "
                "token reproduces their order in llama.cpp's SentencePiece tokenizer"
            )
        scores.setdefault(token, -float(rank))
        previous = token
    for token in vocab.keys() - added:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            formable = (left in vocab or len(left) == 1) and (right in vocab or len(right) == 1)
            if formable and (left, right) not in listed:
                raise UnsupportedModelError(
                    f"unsupported tokenizer: {left!r} + {right!r} make the token {token!r} but are not a listed "
                    "merge; llama.cpp's SentencePiece tokenizer would merge them"
                )
    return scores


def file_name(name: str, kind: TokenizerKind) -> str:
    """The file's `general.name`: the model's name, with "phi-3" in it exactly when the tokenizer needs llama.cpp's
    Phi-3 rule, since llama.cpp applies that rule to any file whose name holds "phi3" or "phi-3"."""
    if kind.phi3_space_swallowing:
        return name if _PHI3_NAME.search(name) else f"phi-3 {name}"
    return _PHI3_NAME.sub(lambda match: match.group(0).replace("-", "").replace("3", " 3"), name)


# --------------------------------------------------------------------------------------------------------------
# The vocabulary


def _chat_template(tokenizer: Any) -> str | list[dict[str, str]] | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: GGUF has a default plus named extras
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None


def _token_table(tokenizer: Any, model: dict[str, Any], kind: TokenizerKind, n_vocab: int) -> tuple[list, list]:
    """(tokens, token types), one per embedding row."""
    normal = gguf.TokenType.NORMAL
    by_id: dict[int, tuple[str, int]] = {index: (token, normal) for token, index in model["vocab"].items()}
    if kind.model == "llama":  # the byte-fallback tokens: llama.cpp looks them up by type and spelling
        by_id.update({i: (t, gguf.TokenType.BYTE) for i, (t, _) in by_id.items() if _BYTE_TOKEN.fullmatch(t)})
    for index, added in tokenizer.added_tokens_decoder.items():
        # Special tokens are CONTROL: llama.cpp matches them whole and hides them when printing by default.
        # Added tokens that are not special are USER_DEFINED: also matched whole, but printed.
        by_id[index] = (added.content, gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= n_vocab:
        raise UnsupportedModelError(
            f"the tokenizer has ids up to {max(by_id)} but the embedding matrix has only {n_vocab} rows"
        )
    tokens, types = [], []
    for index in range(n_vocab):
        # Rows with no token (the embedding padded to a multiple of 32, or gaps in the ids) get placeholders,
        # so that the token count equals the number of embedding rows, as llama.cpp requires.
        token, token_type = by_id.get(index, (f"[PAD{index}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(int(token_type))
    return tokens, types


def _special_ids(tokenizer: Any, n_vocab: int, generation_config: dict[str, Any]) -> dict[str, int]:
    special_ids = {
        name: token_id
        for name in ("bos", "eos", "unk", "pad")
        if (token_id := getattr(tokenizer, f"{name}_token_id", None)) is not None
    }
    # A chat model usually stops on an end-of-turn token besides EOS (chattune writes both into
    # generation_config.json): give llama.cpp the first other one as its end-of-turn token.
    stop_ids = generation_config.get("eos_token_id")
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    extra = [i for i in stop_ids if isinstance(i, int) and i != special_ids.get("eos") and 0 <= i < n_vocab]
    if extra:
        special_ids["eot"] = extra[0]
    return special_ids


def read_vocab(tokenizer: Any, kind: TokenizerKind, n_vocab: int, generation_config: dict[str, Any]) -> Vocab:
    """The vocabulary in llama.cpp's terms, with as many tokens as the embedding matrix has rows."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens, types = _token_table(tokenizer, model, kind, n_vocab)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    scores = None
    if kind.model == "llama":
        by_token = merge_scores(model, _added_contents(tokenizer))
        floor = -float(len(merges))  # tokens no merge makes (characters, bytes, specials): never a merge result
        normal = gguf.TokenType.NORMAL
        scores = [by_token.get(token, floor) if type_ == normal else floor for token, type_ in zip(tokens, types)]
        # llama.cpp ignores merges for this tokenizer; readers such as transformers' GGUF loader use them, and
        # GGUF separates the two sides of a merge by a space, which a SentencePiece token never holds.
        if any(len(merge.split(" ")) != 2 for merge in merges):
            merges = []
    special_ids = _special_ids(tokenizer, n_vocab, generation_config)

    # Whether the tokenizer puts BOS / EOS around a text by itself, as the HF tokenizer really does it.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = "bos" in special_ids and len(full) > len(plain) and full[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and len(full) > len(plain) and full[-1] == special_ids["eos"]

    return Vocab(kind, tokens, types, scores, merges, special_ids, add_bos, add_eos, _chat_template(tokenizer))


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """The tokenizer.* keys of the file."""
    writer.add_tokenizer_model(vocab.kind.model)
    writer.add_tokenizer_pre(vocab.kind.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.kind.model == "llama":
        writer.add_add_space_prefix(vocab.kind.add_space_prefix)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
