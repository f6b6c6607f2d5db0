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
from conftest import CORPUS, load_llama, make_tiny_model, shared_tokenizer_path

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


def _transformers_round_trip(model_dir: Path, path: Path) -> None:
    """transformers' own GGUF reader: the model and tokenizer read from the file alone match the originals."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in _chat_texts(tokenizer):
        assert (
            from_gguf(text, add_special_tokens=False)["input_ids"]
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    ids = torch.tensor([tokenizer(_chat_texts(tokenizer)[0], add_special_tokens=False)["input_ids"]])
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
