"""Export a Hugging Face model folder to a single GGUF file for llama.cpp, Ollama and friends.

    python3 -m chattune.export.gguf MODEL_DIR --outtype f16|q8_0|f32|q4_k_m|q5_k_m|q6_k|... [--out FILE]
                                    [--overwrite] [--system_prompt TEXT]

An Ollama Modelfile is written beside the file, named after it (chattune.export.ollama).

An export never destroys (`check_targets`, before any tensor is converted): an existing file is replaced only with
--overwrite, a file of the model folder itself (its weights, config or tokenizer) never, and a target that cannot
be written (a folder, a folder without write permission) is refused rather than found out after the work.

Supported architectures (SUPPORTED_ARCHITECTURES): Llama and Mistral (llama.cpp's `llama`), Qwen2 (`qwen2`),
Phi-3 (`phi3`), Gemma 2 and Gemma 3 text models (`gemma2`, `gemma3`), Phi-2 (`phi2`) and StableLM (`stablelm`).
Tokenizers: byte-level BPE (GPT-2, Qwen2, Llama 3) and SentencePiece-style BPE with byte fallback (Llama 2,
Mistral, Phi-3, Gemma), see `chattune.export.gguf_vocab`.
A model that llama.cpp would run differently from transformers (an activation, a RoPE scaling or an attention
variant its graph for the architecture does not have) is refused with a message saying why, before any weight
is read; `check_exportable` runs the same checks at the start of a training run. The file is written under a
temporary name and renamed into place, so a crash never leaves a truncated `.gguf` that looks finished.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from chattune.atomic import atomic_path, creation_problem
from chattune.cli import entry_point, report_progress
from chattune.config.outtypes import ALL_OUTTYPES, EMBEDDING_TYPES, check_embedding_type
from chattune.errors import ChattuneError
from chattune.export.gguf_vocab import (
    TokenizerKind,
    UnsupportedModelError,
    file_name,
    read_vocab,
    tokenizer_kind,
    write_vocab,
)
from chattune.export.ollama import MODELFILE_SUFFIX, modelfile_path, write_modelfile
from chattune.export.quantize import LLAMA_QUANT_TYPES, quantize_gguf, require_quantizer

__all__ = [
    "ALL_OUTTYPES",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "check_exportable",
    "check_targets",
    "export_gguf",
    "main",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Architectures


def _no_check(config: dict[str, Any]) -> str | None:
    return None


def _no_keys(writer: Any, config: dict[str, Any]) -> None:
    return None


def _phi3_keys(writer: Any, config: dict[str, Any]) -> None:
    # llama.cpp reads the window but does not apply it to Phi-3 yet (see `_context_length`); written as it is.
    if _uses_sliding_window(config):
        writer.add_sliding_window(int(config["sliding_window"]))


def _attention_scale_problem(config: dict[str, Any], layers_of_27b: int) -> str | None:
    """llama.cpp does not read Gemma's `query_pre_attn_scalar`: it scales queries by 1/sqrt(head_dim), or by
    1/sqrt(hidden_size / heads) for a model with as many layers as the 27B one, as Google's models have it."""
    head_dim = _head_dim(config)
    expected = int(config["hidden_size"]) // int(config["num_attention_heads"])
    expected = expected if int(config["num_hidden_layers"]) == layers_of_27b else head_dim
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(expected):
        return f"query_pre_attn_scalar {scalar} (llama.cpp scales queries by 1/sqrt({expected}) for this model)"
    return None


def _gemma_problem(config: dict[str, Any], layers_of_27b: int) -> str | None:
    if config.get("attention_bias"):
        return "attention biases (llama.cpp's Gemma has none)"
    if config.get("use_bidirectional_attention"):
        return "bidirectional attention (an embedding model, not a causal decoder)"
    if not set(config.get("layer_types") or ()) <= {"sliding_attention", "full_attention"}:
        return f"layer types {sorted(set(config['layer_types']))} (llama.cpp knows sliding and full attention)"
    return _attention_scale_problem(config, layers_of_27b)


def _gemma2_problem(config: dict[str, Any]) -> str | None:
    # llama.cpp's gemma2 always caps both with tanh and always reuses the embedding as the output matrix.
    if config.get("attn_logit_softcapping") is None or config.get("final_logit_softcapping") is None:
        return "Gemma 2 without attention or final logit soft-capping (llama.cpp always applies both)"
    if not config.get("tie_word_embeddings", True):
        return "Gemma 2 with an output matrix of its own (llama.cpp always uses the token embedding)"
    return _gemma_problem(config, layers_of_27b=46)


def _gemma3_problem(config: dict[str, Any]) -> str | None:
    if config.get("attn_logit_softcapping") is not None:
        return "Gemma 3 with attention logit soft-capping (llama.cpp's gemma3 has none)"
    if _rope_parameters(config, "sliding_attention")["rope_type"] != "default":
        return "RoPE scaling on the sliding-window layers (llama.cpp scales the full-attention layers only)"
    return _gemma_problem(config, layers_of_27b=62)


def _write_sliding_window(writer: Any, config: dict[str, Any]) -> None:
    """The window and which layers use it, one flag per layer as the config's `layer_types` says. Without a
    window every flag is off: llama.cpp's gemma2 would otherwise slide a 4096-token window on every other layer."""
    windowed = _uses_sliding_window(config)
    if windowed:
        writer.add_sliding_window(int(config["sliding_window"]))
    layer_types = config.get("layer_types") or ["full_attention"] * int(config["num_hidden_layers"])
    writer.add_sliding_window_pattern([windowed and kind == "sliding_attention" for kind in layer_types])


def _gemma2_keys(writer: Any, config: dict[str, Any]) -> None:
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    _write_sliding_window(writer, config)


def _gemma3_keys(writer: Any, config: dict[str, Any]) -> None:
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    _write_sliding_window(writer, config)
    # The sliding-window layers rotate with a base of their own (10000 where full layers use 1e6).
    writer.add_rope_freq_base_swa(float(_rope_parameters(config, "sliding_attention")["rope_theta"]))


def _phi2_problem(config: dict[str, Any]) -> str | None:
    if config.get("qk_layernorm"):
        return "Phi with q/k layer norms (llama.cpp's phi2 has none)"
    return None


def _stablelm_problem(config: dict[str, Any]) -> str | None:
    if config.get("qk_layernorm"):  # StableLM 2 12B: one LayerNorm module per head, not written here
        return "StableLM with per-head q/k layer norms (qk_layernorm), which the exporter does not write"
    return None


_GEMMA = {"activations": ("gelu_pytorch_tanh",), "norm_offset": 1.0, "sliding_window": True}


# The RoPE scalings llama.cpp's `llama` applies as transformers does; Llama 3.1's as a `rope_freqs` tensor.
_LLAMA_ROPE = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class _Arch:
    """How a Hugging Face architecture is written as a llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    # Whether q/k projections must be re-ordered for llama.cpp's rotary layout (see `_interleave_rope_rows`).
    interleave_rope: bool = False
    # The activations (config `hidden_act` / `hidden_activation`) llama.cpp's graph for it computes.
    activations: tuple[str, ...] = ("silu",)
    # The RoPE scalings llama.cpp applies to it as transformers does.
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")
    # Gemma's RMSNorm scales by (1 + weight), llama.cpp's by the weight: added to every norm weight.
    norm_offset: float = 0.0
    # Whether llama.cpp applies the config's sliding-window attention (otherwise see `_context_length`).
    sliding_window: bool = False
    # Whether llama.cpp reads an output matrix of its own; if not, it always reuses the token embedding.
    own_output: bool = True
    # Whether llama.cpp requires one (Phi-2, StableLM): a model with tied embeddings then gets a copy.
    output_required: bool = False
    # LayerNorm with bias (Phi-2, StableLM) rather than RMSNorm: which epsilon is written.
    layer_norm: bool = False
    # The architecture's own checks (a reason to refuse, or None) and hyper-parameter keys.
    check: Callable[[dict[str, Any]], str | None] = _no_check
    keys: Callable[[Any, dict[str, Any]], None] = _no_keys


SUPPORTED_ARCHITECTURES: dict[str, _Arch] = {
    "LlamaForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, interleave_rope=True, rope_types=_LLAMA_ROPE),
    # Mistral is a Llama with sliding-window attention, which llama.cpp's `llama` does not apply.
    "MistralForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, interleave_rope=True, rope_types=_LLAMA_ROPE),
    # llama.cpp runs Qwen2 with the "NeoX" rotary layout, which is the one Hugging Face uses: no re-ordering.
    "Qwen2ForCausalLM": _Arch(gguf.MODEL_ARCH.QWEN2),
    # Fused qkv_proj and gate_up_proj, stored as they are (attn_qkv, ffn_up: llama.cpp splits them in the same
    # order). Phi-3's long-context RoPE ("longrope", the 128k models) is not written.
    "Phi3ForCausalLM": _Arch(gguf.MODEL_ARCH.PHI3, rope_types=("default",), keys=_phi3_keys),
    # Gemma: norm weights +1 (see `_Arch.norm_offset`), embeddings scaled by sqrt(hidden_size) and the GELU
    # (tanh) MLP, which llama.cpp's graphs do themselves; sliding-window layers as `layer_types` lists them.
    "Gemma2ForCausalLM": _Arch(
        gguf.MODEL_ARCH.GEMMA2,
        rope_types=("default",),
        own_output=False,
        check=_gemma2_problem,
        keys=_gemma2_keys,
        **_GEMMA,
    ),
    "Gemma3ForCausalLM": _Arch(
        gguf.MODEL_ARCH.GEMMA3, rope_types=("default", "linear"), check=_gemma3_problem, keys=_gemma3_keys, **_GEMMA
    ),
    # Phi-2: attention and MLP side by side on one LayerNorm, biases everywhere (lm_head too), partial rotary.
    "PhiForCausalLM": _Arch(
        gguf.MODEL_ARCH.PHI2,
        activations=("gelu_new", "gelu_pytorch_tanh"),
        rope_types=("default",),
        output_required=True,
        layer_norm=True,
        check=_phi2_problem,
    ),
    # StableLM (2): LayerNorm with bias, partial rotary, optional q/k/v biases and parallel residual.
    "StableLmForCausalLM": _Arch(
        gguf.MODEL_ARCH.STABLELM,
        rope_types=("default",),
        output_required=True,
        layer_norm=True,
        check=_stablelm_problem,
    ),
}

# outtype (chattune.config.outtypes.WRITTEN_OUTTYPES) -> (storage type of 2-D weight matrices, general.file_type).
# 1-D tensors (norms, biases) stay F32.
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Checkpoint entries that are buffers, not weights: nothing in GGUF corresponds to them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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


def _rope_parameters(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers 5 keeps these in `rope_parameters` (per layer type where layer types differ, as in Gemma 3);
    older configs in `rope_theta` + `rope_scaling` + `partial_rotary_factor`."""
    params = dict(config.get("rope_scaling") or {})
    nested = config.get("rope_parameters") or {}
    params.update(nested.get(layer_type, {}) if isinstance(nested.get(layer_type), dict) else nested)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def _config_problem(config: dict[str, Any], arch: _Arch) -> str | None:
    """Why llama.cpp would compute something else than transformers with this config, or None."""
    activation = config.get("hidden_activation") or config.get("hidden_act") or arch.activations[0]
    if activation not in arch.activations:
        return f"activation {activation!r} (llama.cpp computes {', '.join(arch.activations)} for this architecture)"
    n_head = int(config.get("num_attention_heads") or 1)
    n_kv_head = int(config.get("num_key_value_heads") or n_head)
    if n_head % n_kv_head:  # llama.cpp shares each KV head among n_head / n_kv_head query heads
        return f"{n_kv_head} key/value heads for {n_head} attention heads (not a whole number of heads per group)"
    rope_type = _rope_parameters(config)["rope_type"]
    if rope_type not in arch.rope_types:
        return f"RoPE scaling {rope_type!r} is not supported by the exporter for this architecture"
    return arch.check(config)


def check_exportable(config: dict[str, Any], tokenizer: Any | None = None, where: Any = "the model") -> None:
    """What export_gguf refuses before reading a weight: the architecture, its configuration and the tokenizer.

    train.py runs it on the base model at the start of a run that ends in --export_gguf, since fine-tuning
    changes none of them, so an export that cannot succeed fails before the training rather than after it.
    """
    _, arch = _architecture(config, where)
    problem = _config_problem(config, arch)
    if problem:
        raise UnsupportedModelError(f"{where}: {problem}")
    if tokenizer is not None:
        tokenizer_kind(tokenizer)


def _load_config(model_dir: Path) -> tuple[dict[str, Any], _Arch]:
    """The config with transformers' defaults filled in (hub configs leave out what equals the default)."""
    from transformers import AutoConfig

    raw = _read_json(model_dir / "config.json")
    _, arch = _architecture(raw, model_dir)  # first, so that an unknown model type is refused by name
    config = AutoConfig.from_pretrained(str(model_dir)).to_dict()
    problem = _config_problem(config, arch)
    if problem:
        raise UnsupportedModelError(f"{model_dir}: {problem}")
    if config.get("quantization_config"):
        raise UnsupportedModelError(
            f"{model_dir}: the checkpoint is quantized ({config['quantization_config'].get('quant_method', '?')}); "
            "export a float (merged) model"
        )
    return config, arch


def _load_tokenizer(model_dir: Path) -> tuple[Any, TokenizerKind]:
    """The folder's tokenizer and the llama.cpp tokenizer to write it as; refuses what GGUF cannot reproduce."""
    from chattune.models.tokenizer import load_tokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{model_dir}: no tokenizer (tokenizer.json) to export")
    tokenizer = load_tokenizer(model_dir)
    return tokenizer, tokenizer_kind(tokenizer)


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
# Writing


def default_output_path(model_dir: str | Path, outtype: str) -> Path:
    model_dir = Path(model_dir).resolve()
    return model_dir / f"{model_dir.name}-{outtype}.gguf"


def _uses_sliding_window(config: dict[str, Any]) -> bool:
    if not config.get("sliding_window"):
        return False
    if config.get("layer_types"):
        return "sliding_attention" in config["layer_types"]
    return bool(config.get("use_sliding_window", True))


def _context_length(config: dict[str, Any], arch: _Arch, where: Any) -> int:
    """The context length, or the attention window of a sliding-window model that llama.cpp runs without one
    (Mistral v0.1, Phi-3): up to the window both compute the same, past it llama.cpp attends to every token."""
    length = int(config.get("max_position_embeddings") or 2048)
    window = int(config.get("sliding_window") or 0)
    if arch.sliding_window or not _uses_sliding_window(config) or window >= length:
        return length
    logger.warning(
        "%s: llama.cpp runs %s without sliding-window attention, so the file's context length is the window, "
        "%d tokens, within which it computes what transformers does (the model's own is %d)",
        where,
        gguf.MODEL_ARCH_NAMES[arch.gguf_arch],
        window,
        length,
    )
    return window


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def _rope_dim(config: dict[str, Any]) -> int:
    return int(_head_dim(config) * float(_rope_parameters(config)["partial_rotary_factor"]))


def _write_hparams(writer: Any, arch: _Arch, config: dict[str, Any], n_vocab: int, where: Any) -> None:
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    rope = _rope_parameters(config)
    writer.add_context_length(_context_length(config, arch, where))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    if _head_dim(config) != hidden // n_head:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_rope_dim(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if arch.layer_norm:
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-5)))
    else:
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(n_vocab)
    _write_rope_scaling(writer, rope, int(config.get("max_position_embeddings") or 2048))
    arch.keys(writer, config)


def _write_rope_scaling(writer: Any, rope: dict[str, Any], max_positions: int) -> None:
    """Linear and YaRN scaling as keys (Llama 3.1's is the `rope_freqs` tensor, see `_write_tensors`)."""
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", max_positions)))


def _convert(hf_name: str, tensor: Any, arch: _Arch, config: dict[str, Any]) -> np.ndarray:
    """A checkpoint tensor as float32, in llama.cpp's convention for the architecture."""
    import torch

    data = tensor.to(torch.float32).numpy()
    if arch.interleave_rope and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        n_head = int(config["num_attention_heads"])
        data = _interleave_rope_rows(data, n_head if ".q_proj." in hf_name else int(config["num_key_value_heads"]))
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        data = data + np.float32(arch.norm_offset)
    return data


def _add_tensor(writer: Any, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    encoded, stored_as = _encode_tensor(data, qtype)
    writer.add_tensor(name, encoded, raw_dtype=stored_as)


def _write_tensors(
    writer: Any,
    model_dir: Path,
    arch: _Arch,
    config: dict[str, Any],
    qtype: gguf.GGMLQuantizationType,
    embedding_qtype: gguf.GGMLQuantizationType | None = None,
) -> int:
    """Every tensor of the checkpoint under llama.cpp's name; returns the number of embedding rows. The token
    embedding and the output matrix are stored as `embedding_qtype` when it is given, else as `qtype`."""
    embedding_qtype = embedding_qtype or qtype
    import torch

    names = gguf.get_tensor_name_map(arch.gguf_arch, int(config["num_hidden_layers"]))
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
        if gguf_name == "token_embd.weight":
            n_vocab, embedding = tensor.shape[0], tensor
        stored_as = embedding_qtype if gguf_name == "token_embd.weight" else qtype
        _add_tensor(writer, gguf_name, _convert(hf_name, tensor, arch, config), stored_as)
    if n_vocab is None:
        raise UnsupportedModelError(f"{model_dir}: the checkpoint has no token embedding (embed_tokens)")
    # Without an `output` tensor llama.cpp reuses the embedding (tied weights). A checkpoint that stores
    # lm_head although the config says "tied" keeps it, as transformers does, unless it is the same matrix.
    if output is None and arch.output_required:
        output = embedding  # tied: the checkpoint has no lm_head, llama.cpp needs the matrix under its own name
    if arch.output_required or (
        output is not None and not (config.get("tie_word_embeddings") and torch.equal(output, embedding))
    ):
        if not arch.own_output:
            raise UnsupportedModelError(
                f"{model_dir}: lm_head differs from the token embedding, and llama.cpp's "
                f"{gguf.MODEL_ARCH_NAMES[arch.gguf_arch]} always computes the output with the embedding"
            )
        _add_tensor(writer, "output.weight", _convert("lm_head.weight", output, arch, config), embedding_qtype)
    rope = _rope_parameters(config)
    if rope["rope_type"] == "llama3":
        writer.add_tensor(
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            _llama3_rope_factors(rope, _rope_dim(config), int(config.get("max_position_embeddings") or 2048)),
        )
    return int(n_vocab)


# What an export writes: the GGUF file and its Ollama Modelfile. Nothing else is written into a model folder.
EXPORT_SUFFIXES = (".gguf", MODELFILE_SUFFIX)


class ExportTargetError(ChattuneError):
    """An export target that must not, or cannot, be written; refused before any tensor is converted."""


def check_targets(model_dir: str | Path, targets: Sequence[str | Path], overwrite: bool = False) -> None:
    """Refuse, before any work, the files an export must not write: an existing file without `overwrite`, a file
    of the model folder itself whatever `overwrite` says, a folder, or a place where no file can be created."""
    model_dir = Path(model_dir).resolve()
    for target in map(Path, targets):
        problem = _target_problem(model_dir, target, overwrite)
        if problem:
            raise ExportTargetError(f"{target}: {problem}")


def _target_problem(model_dir: Path, target: Path, overwrite: bool) -> str | None:
    if target.is_dir():
        return "is a folder; --out names the .gguf file to write"
    if _in_model_folder(model_dir, target):
        return (
            f"is in the model folder {model_dir} and is not a .gguf file: an export never writes over the model's "
            "own files (weights, config, tokenizer); choose another --out"
        )
    if target.exists() and not overwrite:
        return "exists; pass --overwrite to replace it, or choose another --out"
    problem = creation_problem(target.parent)
    return f"cannot be written ({problem}); choose another --out" if problem else None


def _in_model_folder(model_dir: Path, target: Path) -> bool:
    """Whether `target` names a file of the model folder other than an export (a .gguf file or its Modelfile),
    also through a linked folder. Names that do not exist yet count too: a `model.safetensors` beside sharded
    weights would be loaded in their place. (A link to a weight file elsewhere is safe: the rename replaces the
    link, not the file.)"""
    return target.suffix not in EXPORT_SUFFIXES and target.resolve().parent == model_dir


def export_gguf(
    model_dir: str | Path,
    outtype: str = "f16",
    out: str | Path | None = None,
    overwrite: bool = False,
    embedding_type: str | None = None,
) -> Path:
    """Write `model_dir` (a Hugging Face model folder) as one GGUF file and return its path.

    `outtype` is the storage of the weight matrices: "f16", "q8_0" or "f32" (norms and biases are always F32),
    or one of llama.cpp's types (LLAMA_QUANT_TYPES: "q4_k_m", "q5_k_m", "q6_k", ...), made from an f16 file by
    llama.cpp's quantizer. `embedding_type` ("f16" or "f32"), when given, stores the token embedding and the output
    matrix apart (types chattune writes only). `out` defaults to `MODEL_DIR/<folder-name>-<outtype>.gguf`; an
    existing file there is replaced only with `overwrite` (see check_targets, which runs first).
    """
    if outtype not in ALL_OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}: choose one of {', '.join(ALL_OUTTYPES)}")
    check_embedding_type(outtype, embedding_type)
    out = Path(out) if out is not None else default_output_path(model_dir, outtype)
    check_targets(model_dir, [out], overwrite)
    if outtype in LLAMA_QUANT_TYPES:
        return _export_quantized(model_dir, outtype, out)
    return _write_gguf(model_dir, outtype, out, embedding_type)


def _export_quantized(model_dir: str | Path, outtype: str, out: Path) -> Path:
    """f16 into a hidden file beside `out`, then llama.cpp's quantizer; the f16 file is removed either way."""
    require_quantizer(outtype)  # before the f16 file is written
    f16 = out.with_name(f".{out.stem}.f16-{os.getpid()}.gguf")
    try:
        _write_gguf(model_dir, "f16", f16)
        quantize_gguf(f16, out, outtype)
    finally:
        f16.unlink(missing_ok=True)
    logger.info("wrote %s (%s, quantized by llama.cpp)", out, outtype)
    return out


def _write_gguf(model_dir: str | Path, outtype: str, out: Path, embedding_type: str | None = None) -> Path:
    model_dir = Path(model_dir).resolve()
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise UnsupportedModelError(
            f"{model_dir} is a LoRA adapter, not a full model: train with --lora_merge and export the merged "
            "model folder models/<run_name>"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    config, arch = _load_config(model_dir)
    tokenizer, kind = _load_tokenizer(model_dir)  # before any weight is read: an unsupported tokenizer fails fast
    qtype, file_type = OUTTYPES[outtype]
    embedding_qtype = OUTTYPES[embedding_type][0] if embedding_type else None

    with atomic_path(out) as staging:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
        try:
            n_vocab = _write_tensors(writer, model_dir, arch, config, qtype, embedding_qtype)
            writer.add_name(file_name(model_dir.name, kind))
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_hparams(writer, arch, config, n_vocab, model_dir)
            generation_config = _read_json(model_dir / "generation_config.json")
            write_vocab(writer, read_vocab(tokenizer, kind, n_vocab, generation_config))

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            for handle in writer.fout or []:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            writer.close()
    embeddings = f", token embedding and output matrix {embedding_type}" if embedding_type else ""
    logger.info("wrote %s (%s%s, %d tokens)", out, outtype, embeddings, n_vocab)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m chattune.export.gguf",
        description="Export a Hugging Face model folder to GGUF (architectures: see docs/export.md), with an Ollama "
        "Modelfile beside the file, named after it (NAME.gguf, NAME.Modelfile).",
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
    parser.add_argument(
        "--embedding_type",
        choices=EMBEDDING_TYPES,
        default=None,
        help="store the token embedding and the output matrix as this type instead of --outtype (with f32, f16 or "
        "q8_0; e.g. q8_0 with f16 keeps a small model's scores: docs/export.md)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output file (default: MODEL_DIR/<name>-<outtype>.gguf)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file and its Modelfile (never a file of the model folder itself)",
    )
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
    out = args.out or default_output_path(args.model_dir, args.outtype)
    modelfile = modelfile_path(out)
    check_embedding_type(args.outtype, args.embedding_type)
    check_targets(args.model_dir, [out, modelfile], args.overwrite)  # the Modelfile too: it may be edited by hand
    report_progress(f"exporting {args.model_dir} to {out}", _nothing_kept(args.model_dir, out, args.outtype))
    try:
        path = export_gguf(args.model_dir, args.outtype, out, args.overwrite, args.embedding_type)
    except FileNotFoundError as error:
        raise ChattuneError(str(error)) from None
    report_progress(f"writing {modelfile}", f"wrote {path}; {modelfile} was not written")
    write_modelfile(path, _load_tokenizer(Path(args.model_dir))[0], args.system_prompt)
    print(path)
    return 0


def _nothing_kept(model_dir: Path, out: Path, outtype: str) -> str:
    """What an interrupted export leaves: atomic_path and _export_quantized remove their files on the way out."""
    kept = "the previous file is intact" if out.exists() else "nothing of it is left"
    intermediate = ", no f16 intermediate is left" if outtype in LLAMA_QUANT_TYPES else ""
    return f"{out} was not written ({kept}{intermediate}); {model_dir} is untouched"


if __name__ == "__main__":
    sys.exit(main())
