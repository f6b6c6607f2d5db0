"""GGUF export of the architectures and tokenizers beyond Llama / Qwen2 with byte-level BPE: tiny random-weight
models of each family are exported at f16 and run by llama.cpp itself (skipped where llama-cpp-python is not
installed), which must tokenize chat-formatted text to the same ids as the Hugging Face tokenizer and compute
the same logits; where transformers can read the architecture back from GGUF, that round trip is checked too."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from chattune.export.gguf import export_gguf
from conftest import CORPUS, load_llama, make_gemma_like_tokenizer, make_tiny_model, shared_tokenizer_path

CONVERSATIONS = [
    [
        {"role": "system", "content": f"You control the house. Devices: light.kitchen, fan.bedroom ({i})"},
        {"role": "user", "content": f"Turn on the kitchen light number {i}0, ça va? 日本語 DON'T  two  spaces"},
        {"role": "assistant", "content": 'Turning it on.\n```homeassistant\n{"service": "light.turn_on"}\n```'},
        {"role": "user", "content": "And the fan?\n\n   Indented\ttab 🙂 1234567"},
        {"role": "assistant", "content": "The fan is on too."},
    ]
    for i in range(3)
]

# f16 weights and llama.cpp's f16 KV cache: measured deviations are reported per family in docs/export.md;
# 1% of the logits' spread still catches a wrong head order, norm convention, scale or vocabulary.
TOLERANCE = 1e-2


def _chat_texts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]


def _llama_cpp_matches(model_dir: Path, path: Path, extra_texts: list[str] = ()) -> float:
    """Asserts llama.cpp's token ids and f16 logits against transformers'; returns max |Δlogit| / std."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = load_llama(path, logits_all=True, n_ctx=1024, n_threads=1, verbose=False)
    texts = _chat_texts(tokenizer)
    for text in [*texts, *extra_texts]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template

    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        original = model(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    assert logits.shape == original.shape
    deviation = float(np.abs(logits - original).max() / original.std())
    print(f"{model_dir.name}: {len(ids)} tokens, max |llama.cpp - transformers| = {deviation:.2e} x std")
    assert deviation < TOLERANCE
    return deviation


def _transformers_round_trip(model_dir: Path, path: Path, tokenizer: bool = True, model: bool = True) -> None:
    """transformers' own GGUF reader: the tokenizer and model read from the file alone match the originals."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = _chat_texts(original_tokenizer)
    if tokenizer:
        from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for text in texts:
            expected = original_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert from_gguf(text, add_special_tokens=False)["input_ids"] == expected
    if not model:
        return
    ids = torch.tensor([original_tokenizer(texts[0], add_special_tokens=False)["input_ids"]])
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = original(ids).logits, exported(ids).logits
    assert (got - expected).abs().max().item() < TOLERANCE * expected.std().item()


def _field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key].contents()


# --------------------------------------------------------------------------------------------------------------
# Mistral with a SentencePiece vocabulary


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    tokenizer = shared_tokenizer_path("mistral-v1-instruct")
    return make_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny-mistral"), arch="mistral", seed=2)


def test_mistral_with_sentencepiece_vocab_runs_in_llama_cpp(mistral_dir, tmp_path):
    from transformers import AutoTokenizer

    path = export_gguf(mistral_dir, "f16", out=tmp_path / "alone" / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(mistral_dir)
    assert _field(path, "general.architecture") == "llama"
    assert _field(path, "tokenizer.ggml.model") == "llama"
    assert _field(path, "tokenizer.ggml.add_space_prefix") is False  # "<s>[INST]": no "▁" after a special token
    assert _field(path, "tokenizer.ggml.add_bos_token") is True
    types = _field(path, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[tokenizer.convert_tokens_to_ids("</s>")] == gguf.TokenType.CONTROL
    # Raw text after BOS exercises the merge order broadly: every line of the test corpus, and runs of spaces.
    extra = [tokenizer.bos_token + line for line in dict.fromkeys(CORPUS)] + ["<s>  a   b    c\n\n\n d\t\te"]
    _llama_cpp_matches(mistral_dir, path, extra)
    _transformers_round_trip(mistral_dir, path)


def test_mistral_sliding_window_caps_the_context_length(mistral_dir, tmp_path):
    """llama.cpp's `llama` has no sliding-window attention: the file claims only the length within which it
    computes what transformers does."""
    import json
    import shutil

    model_dir = Path(shutil.copytree(mistral_dir, tmp_path / "windowed"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 256}))
    assert _field(export_gguf(model_dir, "f32", out=tmp_path / "m.gguf"), "llama.context_length") == 256
    assert _field(export_gguf(mistral_dir, "f32", out=tmp_path / "n.gguf"), "llama.context_length") == 1024


# --------------------------------------------------------------------------------------------------------------
# Phi-3

PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)


def make_phi3_like_tokenizer(path: Path) -> Path:
    """Phi-3's tokenizer as Microsoft ships it: Llama 2's SentencePiece vocabulary (here Mistral's, the same
    kind) plus chat markers that swallow the whitespace after them (`rstrip`), as `</s>` does too."""
    import json
    import shutil

    source = shared_tokenizer_path("mistral-v1-instruct")
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        token["rstrip"] = token["content"] == "</s>"
    for offset, content in enumerate(["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]):
        flags = {"single_word": False, "lstrip": False, "normalized": False, "special": True}
        tokenizer["added_tokens"].append({"id": 32000 + offset, "content": content, **flags, "rstrip": offset > 0})
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "chat_template.jinja").write_text(PHI3_TEMPLATE)
    return path


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["full-rotary", "half-rotary"])
def phi3_dir(request, tmp_path_factory) -> Path:
    """Phi-3's layout with grouped-query attention, rotating all of each head (Phi-3) or part of it (Phi-4-mini
    rotates 0.75)."""
    tokenizer = make_phi3_like_tokenizer(tmp_path_factory.mktemp("phi3-tokenizer") / "tok")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": request.param}
    folder = tmp_path_factory.mktemp("tiny-home") / "home-model"  # no "phi-3" in its name
    return make_tiny_model(tokenizer, folder, arch="phi3", seed=3, num_key_value_heads=2, rope_parameters=rope)


def test_phi3_runs_in_llama_cpp(phi3_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(phi3_dir)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids("<|user|>\nhi") == ids("<|user|>hi")  # the newline after the marker is swallowed
    path = export_gguf(phi3_dir, "f16", out=tmp_path / "alone" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_qkv.weight"] == types["blk.1.ffn_up.weight"] == "F16"
    assert _field(path, "general.architecture") == "phi3"
    rotary = AutoConfig.from_pretrained(phi3_dir).rope_parameters["partial_rotary_factor"]
    assert _field(path, "phi3.rope.dimension_count") == int(16 * rotary)  # of the 16-wide heads
    # llama.cpp strips the whitespace after Phi-3's markers only in a file whose name says "phi-3".
    assert _field(path, "general.name") == "phi-3 home-model"
    _llama_cpp_matches(phi3_dir, path)
    if rotary == 1.0:  # transformers' reader takes no partial rotary factor from a `phi3` file
        # It also rebuilds any `phi3` file's tokenizer as the hub's legacy one ("▁" after every special token)
        # and cannot know of the swallowed whitespace, so only the model is compared there.
        _transformers_round_trip(phi3_dir, path, tokenizer=False)


def test_phi3_name_only_where_the_tokenizer_needs_it(tiny_model_dir, tmp_path):
    """llama.cpp applies Phi-3's whitespace stripping to any file whose name holds "phi3": a folder so named,
    with a tokenizer that strips nothing, must not get a name that says so."""
    import shutil

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "Phi-3-vs-phi3"))
    assert _field(export_gguf(model_dir, "f32", out=tmp_path / "m.gguf"), "general.name") == "Phi 3-vs-phi 3"


def test_tokens_stripping_spaces_otherwise_are_refused(tmp_path):
    import json

    from transformers import AutoTokenizer

    from chattune.export.gguf import UnsupportedModelError, check_exportable

    path = make_phi3_like_tokenizer(tmp_path / "tok")
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["added_tokens"][-1]["lstrip"] = True  # <|user|> now also swallows the space before it
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UnsupportedModelError, match=r"'<\|user\|>' strip the spaces"):
        check_exportable({"architectures": ["Phi3ForCausalLM"]}, AutoTokenizer.from_pretrained(path))


# --------------------------------------------------------------------------------------------------------------
# Gemma 2 and 3

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma_dir(request, tmp_path_factory) -> Path:
    tokenizer = make_gemma_like_tokenizer(tmp_path_factory.mktemp("gemma-tokenizer"), GEMMA_TEMPLATE)
    overrides = {"tie_word_embeddings": True}
    if request.param == "gemma3":  # as Gemma 3 4B and up: 10000 on sliding layers, 1e6 scaled 8x on full ones
        full = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
        overrides["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        overrides["rope_parameters"]["full_attention"] = full
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return make_tiny_model(tokenizer, folder, arch=request.param, seed=4, **overrides)


def test_gemma_runs_in_llama_cpp(gemma_dir, tmp_path):
    """The test texts are longer than the 16-token window, so sliding-window layers differ from full ones."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(gemma_dir)
    arch = "gemma3" if config.model_type == "gemma3_text" else "gemma2"
    path = export_gguf(gemma_dir, "f16", out=tmp_path / "alone" / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert _field(path, "general.architecture") == arch
    assert _field(path, "tokenizer.ggml.add_space_prefix") is False
    assert list(_field(path, f"{arch}.attention.sliding_window_pattern")) == [True, False]
    assert _field(path, f"{arch}.attention.key_length") == 32
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}  # tied
    assert len(tokenizer(_chat_texts(tokenizer)[0])["input_ids"]) > 4 * config.sliding_window
    _llama_cpp_matches(gemma_dir, path, [line for line in dict.fromkeys(CORPUS)])
    # transformers' reader cannot rebuild the model: it takes no query_pre_attn_scalar (assumes Google's 256),
    # no per-layer window pattern and no second RoPE base from a file. The tokenizer it can.
    _transformers_round_trip(gemma_dir, path, model=False)


ARCHITECTURES = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "phi": "PhiForCausalLM",
}


def _config(arch: str, **overrides) -> dict:
    from conftest import tiny_config

    overrides = {"tie_word_embeddings": arch == "gemma2", **overrides}  # Gemma 2 has no lm_head of its own
    return {**tiny_config(arch, **overrides).to_dict(), "architectures": [ARCHITECTURES[arch]]}


REFUSED = {  # what llama.cpp would compute differently: refused by check_exportable, before any training
    "gemma2-query-scale": ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    "gemma2-untied": ("gemma2", {"tie_word_embeddings": False}, "an output matrix of its own"),
    "gemma2-no-softcap": ("gemma2", {"final_logit_softcapping": None}, "soft-capping"),
    "gemma3-attn-softcap": ("gemma3", {"attn_logit_softcapping": 50.0}, "attention logit soft-capping"),
    "gemma3-gelu-erf": ("gemma3", {"hidden_activation": "gelu"}, "activation 'gelu'"),
    "gemma3-local-rope-scaled": (
        "gemma3",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            }
        },
        "RoPE scaling on the sliding-window layers",
    ),
    "phi3-longrope": (
        "phi3",
        {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0] * 8,
                "long_factor": [1.0] * 8,
            }
        },
        "RoPE scaling 'longrope'",
    ),
    "mistral-gelu": ("mistral", {"hidden_act": "gelu"}, "activation 'gelu'"),
    "stablelm-more-kv-heads": ("stablelm", {"num_key_value_heads": 32}, "32 key/value heads for 4 attention heads"),
    "stablelm-qk-norm": ("stablelm", {"qk_layernorm": True, "num_key_value_heads": 4}, "per-head q/k layer norms"),
    "phi2-qk-norm": ("phi", {"qk_layernorm": True}, "q/k layer norms"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_configs_llama_cpp_would_run_differently_are_refused(case):
    from chattune.export.gguf import UnsupportedModelError, check_exportable

    arch, overrides, message = REFUSED[case]
    check_exportable(_config(arch, **{"num_key_value_heads": 4} if arch == "stablelm" else {}))  # accepted
    with pytest.raises(UnsupportedModelError, match=message):
        check_exportable(_config(arch, **overrides))


# --------------------------------------------------------------------------------------------------------------
# Phi-2 and StableLM (byte-level BPE vocabularies: the test tokenizer)

SMALL_FAMILIES = {  # id: (TINY_ARCHS name, config overrides)
    "phi2": ("phi", {}),
    "stablelm-qkv-bias": ("stablelm", {"use_qkv_bias": True, "num_key_value_heads": 2}),  # StableLM 2 1.6B
    "stablelm-parallel": ("stablelm", {"use_parallel_residual": True, "num_key_value_heads": 4}),  # no ffn_norm
}


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_layer_norm_families_run_in_llama_cpp(family, test_tokenizer_dir, tmp_path):
    arch, overrides = SMALL_FAMILIES[family]
    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / family, arch=arch, seed=5, **overrides)
    path = export_gguf(model_dir, "f16", out=tmp_path / "alone" / "model.gguf")
    gguf_arch = {"phi": "phi2", "stablelm": "stablelm"}[arch]
    assert _field(path, "general.architecture") == gguf_arch
    assert _field(path, f"{gguf_arch}.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    rotary = {"phi": 0.5, "stablelm": 0.25}[arch]  # transformers' defaults
    assert _field(path, f"{gguf_arch}.rope.dimension_count") == int(16 * rotary)
    _llama_cpp_matches(model_dir, path)
    if arch == "stablelm":  # transformers reads no `phi2` file
        _transformers_round_trip(model_dir, path)


def test_legacy_sentencepiece_tokenizer_puts_the_space_everywhere(mistral_dir, tmp_path):
    """The tokenizer.json of older Llama 2 / Mistral / Phi-3 repositories spells the leading "▁" with a
    normalizer, before every piece of text including after special tokens: llama.cpp's add_space_prefix."""
    import json
    import shutil

    from transformers import AutoTokenizer

    model_dir = Path(shutil.copytree(mistral_dir, tmp_path / "legacy"))
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = None
    tokenizer["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    legacy = AutoTokenizer.from_pretrained(model_dir)
    assert legacy.tokenize("<s>[INST]")[1] == "▁["  # the behaviour under test, as transformers loads it
    path = export_gguf(model_dir, "f16", out=tmp_path / "legacy.gguf")
    assert _field(path, "tokenizer.ggml.add_space_prefix") is True
    llm = load_llama(path, n_ctx=256, n_threads=1, verbose=False)
    for text in [*_chat_texts(legacy), "hello  world", " leading", "<s> after a space</s>\n x"]:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == legacy(text, add_special_tokens=False)["input_ids"]
        ), text
