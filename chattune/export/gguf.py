"""Export a Hugging Face model folder to a single GGUF file for llama.cpp, Ollama and friends.

    python3 -m chattune.export.gguf MODEL_DIR --outtype f16|q8_0|f32|q4_k_m|q5_k_m|q6_k|... [--out FILE]
                                    [--system_prompt TEXT]

An Ollama `Modelfile` is written beside the file (chattune.export.ollama).

Supported: Llama and Qwen2 decoders (`LlamaForCausalLM`, `Qwen2ForCausalLM`) with a byte-level BPE
tokenizer (GPT-2 / Qwen2 / Llama-3 style `tokenizer.json`). Anything else is refused with a message
saying what is supported, before any weight is read. The file is written under a temporary name and
renamed into place, so a crash never leaves a truncated `.gguf` that looks finished.

f32, f16 and q8_0 are written here. The k-quants and llama.cpp's other types are made from the f16 file by
llama.cpp's own quantizer (chattune.export.quantize), as llama-quantize would.

The file is built with the `gguf` package (`gguf.GGUFWriter`, `gguf.quants`, the tensor name map of
`gguf.MODEL_ARCH`), which is maintained together with llama.cpp, so key and tensor names follow it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from chattune.atomic import atomic_path
from chattune.cli import entry_point
from chattune.errors import ChattuneError
from chattune.export.ollama import write_modelfile
from chattune.export.quantize import LLAMA_QUANT_TYPES, quantize_gguf, require_quantizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Arch:
    gguf_arch: gguf.MODEL_ARCH
    # Whether q/k projections must be re-ordered for llama.cpp's rotary layout (see `_interleave_rope_rows`).
    interleave_rope: bool


SUPPORTED_ARCHITECTURES: dict[str, _Arch] = {
    "LlamaForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    # llama.cpp runs Qwen2 with the "NeoX" rotary layout, which is the one Hugging Face uses: no re-ordering.
    "Qwen2ForCausalLM": _Arch(gguf.MODEL_ARCH.QWEN2, interleave_rope=False),
}

# outtype -> (storage type of 2-D weight matrices, general.file_type). 1-D tensors (norms, biases) stay F32.
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Every --outtype: the ones written here, then those llama.cpp's quantizer makes from the f16 file.
ALL_OUTTYPES: tuple[str, ...] = (*OUTTYPES, *LLAMA_QUANT_TYPES)

# Checkpoint entries that are buffers, not weights: nothing in GGUF corresponds to them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# A text whose pre-tokenization tells the byte-level families apart: contractions in both cases (GPT-2
# matches them case-sensitively), long digit runs (Qwen2 splits digits one by one, Llama 3 in threes),
# runs of spaces and newlines, letters outside ASCII, and punctuation glued to words.
_PRE_TOKENIZER_PROBE = (
    "I'm sure we'LL see DON'T you'd 've 12345678 3.14159 x=1000000;\n\n\n  indented\tand\r\n"
    "   spaces   end  Grüße München ça 日本語のテキスト 🙂🙂 ```python\nprint('hi')``` ((a+b)) --flag !!!?"
)

# Split patterns of the byte-level BPE families llama.cpp knows by name (the `tokenizer.ggml.pre` value).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class UnsupportedModelError(ChattuneError, ValueError):
    """The folder holds a model or tokenizer this exporter cannot write faithfully."""


# --------------------------------------------------------------------------------------------------------------
# Reading the folder


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _architecture(config: dict[str, Any], model_dir: Any) -> tuple[str, _Arch]:
    names = config.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name, SUPPORTED_ARCHITECTURES[name]
    found = ", ".join(names) if names else f"model_type={config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"{model_dir}: cannot export architecture {found} to GGUF. Supported architectures: {supported}."
    )


def _check_rope(rope: dict[str, Any], arch: _Arch, where: Any) -> None:
    rope_type = rope["rope_type"]
    if rope_type not in ("default", "linear", "yarn") and not (
        rope_type == "llama3" and arch.gguf_arch == gguf.MODEL_ARCH.LLAMA
    ):
        raise UnsupportedModelError(f"{where}: RoPE scaling {rope_type!r} is not supported by the exporter")


def check_exportable(config: dict[str, Any], tokenizer: Any | None = None, where: Any = "the model") -> None:
    """What export_gguf refuses before reading a weight: the architecture, its RoPE scaling and the tokenizer.

    train.py runs it on the base model at the start of a run that ends in --export_gguf, since fine-tuning
    changes neither, so an export that cannot succeed fails before the training rather than after it.
    """
    _, arch = _architecture(config, where)
    _check_rope(_rope_parameters(config), arch, where)
    if tokenizer is not None:
        _pre_tokenizer_of(tokenizer)


def _iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) for every tensor of the checkpoint, one shard at a time."""
    import torch
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = []
    if files:
        for file in files:
            with safe_open(str(model_dir / file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        return
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors, sharded safetensors or pytorch_model.bin")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps these in `rope_parameters`; older configs in `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


# --------------------------------------------------------------------------------------------------------------
# Tensors


def _interleave_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Re-order the output rows of a Llama q or k projection (or its bias) for llama.cpp.

    Rotary embeddings rotate pairs of features of each head. The original Llama release paired
    neighbours, (0, 1), (2, 3), ..., and llama.cpp's LLAMA architecture does the same. Hugging Face's
    Llama code pairs feature i with feature i + d/2 instead (`rotate_half`), and its conversion script
    shuffled the rows of q_proj and k_proj once, at conversion time, so that the two pairings give the
    same attention scores. An HF Llama checkpoint therefore stores each head as [first members of the
    pairs..., second members...]; here every head is put back to [first_0, second_0, first_1, second_1,
    ...]. v_proj is not rotated and keeps its order. k_proj has one head per KV head (grouped-query
    attention). Qwen2 needs none of this: llama.cpp rotates Qwen2 with the half-split ("NeoX") layout,
    which is what the checkpoint already has, and transformers' GGUF loader undoes this shuffle for
    `llama` files only.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_factors(params: dict[str, Any], head_dim: int, max_positions: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style RoPE scaling, as llama.cpp's `rope_freqs` tensor wants.

    The scaling leaves high frequencies (short wavelengths) alone, divides low frequencies by `factor`,
    and blends the two in between; llama.cpp applies it as `theta_i / rope_freqs[i]`.
    """
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    original = float(params.get("original_max_position_embeddings", max_positions))
    base = float(params["rope_theta"])
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    blend = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)  # 0 -> factor, 1 -> no scaling
    divisor = 1.0 / ((1.0 - blend) / factor + blend)
    return divisor.astype(np.float32)


def _encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """`data` (float32) in the file's storage type. 1-D tensors stay F32, as llama.cpp expects."""
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32, copy=False), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block_size:  # rows that do not split into whole blocks: keep them at F16
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos / eos / unk / pad / eot
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def _detect_pre_tokenizer(backend: Any) -> str:
    """The `tokenizer.ggml.pre` name of a byte-level BPE tokenizer (a `tokenizers.Tokenizer`).

    Decided by behaviour, not by reading the JSON: the tokenizer's own pre-tokenizer and each known
    family's split a probe text, and the family that splits it identically is the answer.
    """
    from tokenizers import Regex, pre_tokenizers

    model_type = type(backend.model).__name__
    if model_type != "BPE" or backend.pre_tokenizer is None:
        raise UnsupportedModelError(
            "unsupported tokenizer: GGUF export handles byte-level BPE tokenizers only (GPT-2, Qwen2, Llama 3 "
            f"style), this one is a {model_type} model" + ("" if backend.pre_tokenizer else " without a pre-tokenizer")
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
        f"({', '.join(candidates)}); SentencePiece-style tokenizers (Metaspace, e.g. Mistral v1, Llama 2) "
        "are not supported"
    )


def _chat_template(tokenizer: Any) -> str | list[dict[str, str]] | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: GGUF has a default plus named extras
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None


def _load_tokenizer(model_dir: Path) -> tuple[Any, str]:
    """The folder's tokenizer and its `tokenizer.ggml.pre` name; refuses tokenizers GGUF export cannot write."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{model_dir}: no tokenizer (tokenizer.json) to export")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer, _pre_tokenizer_of(tokenizer)


def _pre_tokenizer_of(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError("unsupported tokenizer: no fast (tokenizers) backend to read the vocabulary from")
    return _detect_pre_tokenizer(backend)


def _read_vocab(tokenizer: Any, pre: str, n_vocab: int, generation_config: dict[str, Any]) -> _Vocab:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]

    by_id: dict[int, tuple[str, int]] = {
        index: (token, gguf.TokenType.NORMAL) for token, index in model["vocab"].items()
    }
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

    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]

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

    # Whether the tokenizer puts BOS / EOS around a text by itself, as the HF tokenizer really does it.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = "bos" in special_ids and len(full) > len(plain) and full[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and len(full) > len(plain) and full[-1] == special_ids["eos"]

    return _Vocab(tokens, types, merges, pre, special_ids, add_bos, add_eos, _chat_template(tokenizer))


# --------------------------------------------------------------------------------------------------------------
# Writing


def default_output_path(model_dir: str | Path, outtype: str) -> Path:
    model_dir = Path(model_dir).resolve()
    return model_dir / f"{model_dir.name}-{outtype}.gguf"


def export_gguf(model_dir: str | Path, outtype: str = "f16", out: str | Path | None = None) -> Path:
    """Write `model_dir` (a Hugging Face model folder) as one GGUF file and return its path.

    `outtype` is the storage of the weight matrices: "f16", "q8_0" or "f32" (norms and biases are always F32),
    or one of llama.cpp's types (LLAMA_QUANT_TYPES: "q4_k_m", "q5_k_m", "q6_k", ...), made from an f16 file by
    llama.cpp's quantizer. `out` defaults to `MODEL_DIR/<folder-name>-<outtype>.gguf`.
    """
    if outtype in LLAMA_QUANT_TYPES:
        return _export_quantized(model_dir, outtype, out)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}: choose one of {', '.join(ALL_OUTTYPES)}")
    return _write_gguf(model_dir, outtype, out)


def _export_quantized(model_dir: str | Path, outtype: str, out: str | Path | None) -> Path:
    """f16 into a hidden file beside `out`, then llama.cpp's quantizer; the f16 file is removed either way."""
    require_quantizer(outtype)  # before the f16 file is written
    out = Path(out) if out is not None else default_output_path(model_dir, outtype)
    f16 = out.with_name(f".{out.stem}.f16-{os.getpid()}.gguf")
    try:
        _write_gguf(model_dir, "f16", f16)
        quantize_gguf(f16, out, outtype)
    finally:
        f16.unlink(missing_ok=True)
    logger.info("wrote %s (%s, quantized by llama.cpp)", out, outtype)
    return out


def _write_gguf(model_dir: str | Path, outtype: str, out: str | Path | None) -> Path:
    import torch

    model_dir = Path(model_dir).resolve()
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise UnsupportedModelError(
            f"{model_dir} is a LoRA adapter, not a full model: train with --lora_merge and export the merged "
            "model folder models/<run_name>"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    config = _read_json(model_dir / "config.json")
    _, arch = _architecture(config, model_dir)
    rope = _rope_parameters(config)
    _check_rope(rope, arch, model_dir)
    if config.get("quantization_config"):
        raise UnsupportedModelError(
            f"{model_dir}: the checkpoint is quantized ({config['quantization_config'].get('quant_method', '?')}); "
            "export a float (merged) model"
        )
    qtype, file_type = OUTTYPES[outtype]
    out = Path(out) if out is not None else default_output_path(model_dir, outtype)

    n_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_kv_head = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    max_positions = int(config.get("max_position_embeddings", 2048))
    rope_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    tied = bool(config.get("tie_word_embeddings", False))
    tokenizer, pre = _load_tokenizer(model_dir)  # before any weight is read: an unsupported tokenizer fails fast
    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    arch_name = gguf.MODEL_ARCH_NAMES[arch.gguf_arch]

    with atomic_path(out) as staging:
        writer = gguf.GGUFWriter(staging, arch_name)
        try:
            n_vocab, embedding, output = None, None, None
            for hf_name, tensor in _iter_checkpoint(model_dir):
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                if hf_name == "lm_head.weight":  # decided once the embedding has been seen too
                    output = tensor
                    continue
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise UnsupportedModelError(f"{model_dir}: no GGUF name for checkpoint tensor {hf_name!r}")
                data = tensor.to(torch.float32).numpy()
                if arch.interleave_rope and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
                    data = _interleave_rope_rows(data, n_head if ".q_proj." in hf_name else n_kv_head)
                if gguf_name == "token_embd.weight":
                    n_vocab, embedding = data.shape[0], tensor
                encoded, stored_as = _encode_tensor(data, qtype)
                writer.add_tensor(gguf_name, encoded, raw_dtype=stored_as)
            if n_vocab is None:
                raise UnsupportedModelError(f"{model_dir}: the checkpoint has no token embedding (embed_tokens)")
            # Without an `output` tensor llama.cpp reuses the embedding (tied weights). A checkpoint that stores
            # lm_head although the config says "tied" keeps it, as transformers does, unless it is the same matrix.
            if output is not None and not (tied and torch.equal(output, embedding)):
                encoded, stored_as = _encode_tensor(output.to(torch.float32).numpy(), qtype)
                writer.add_tensor("output.weight", encoded, raw_dtype=stored_as)

            rope_type = rope["rope_type"]
            if rope_type == "llama3" and arch.gguf_arch == gguf.MODEL_ARCH.LLAMA:
                writer.add_tensor(
                    gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                    _llama3_rope_factors(rope, rope_dim, max_positions),
                )
            elif rope_type == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(rope["factor"]))
            elif rope_type == "yarn":
                writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                writer.add_rope_scaling_factor(float(rope["factor"]))
                writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", max_positions)))

            writer.add_name(model_dir.name)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_context_length(max_positions)
            writer.add_embedding_length(hidden)
            writer.add_block_count(n_layers)
            writer.add_feed_forward_length(int(config["intermediate_size"]))
            writer.add_head_count(n_head)
            writer.add_head_count_kv(n_kv_head)
            if head_dim != hidden // n_head:
                writer.add_key_length(head_dim)
                writer.add_value_length(head_dim)
            writer.add_rope_dimension_count(rope_dim)
            writer.add_rope_freq_base(float(rope["rope_theta"]))
            writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
            writer.add_vocab_size(n_vocab)

            vocab = _read_vocab(tokenizer, pre, n_vocab, _read_json(model_dir / "generation_config.json"))
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(vocab.pre)
            writer.add_token_list(vocab.tokens)
            writer.add_token_types(vocab.types)
            writer.add_token_merges(vocab.merges)
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

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            for handle in writer.fout or []:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            writer.close()
    logger.info("wrote %s (%s, %d tokens)", out, outtype, n_vocab)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m chattune.export.gguf",
        description="Export a Hugging Face model folder (Llama or Qwen2, byte-level BPE tokenizer) to GGUF, with an "
        "Ollama Modelfile beside the file.",
        epilog="f32, f16 and q8_0 are written by chattune; the other types by llama.cpp's quantizer from the f16 "
        "file, which needs llama-cpp-python (docs/export.md).",
    )
    parser.add_argument("model_dir", type=Path, help="folder with config.json, weights and tokenizer")
    parser.add_argument(
        "--outtype",
        choices=ALL_OUTTYPES,
        default="f16",
        metavar="TYPE",
        help=f"weight storage: {', '.join(ALL_OUTTYPES)} (default: f16)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output file (default: MODEL_DIR/<name>-<outtype>.gguf)")
    parser.add_argument(
        "--system_prompt",
        default=None,
        help="SYSTEM of the Ollama Modelfile written beside the file (default: the chat template's own, if any)",
    )
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = export_gguf(args.model_dir, args.outtype, args.out)
    except FileNotFoundError as error:
        raise ChattuneError(str(error)) from None
    write_modelfile(path, _load_tokenizer(Path(args.model_dir))[0], args.system_prompt)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
