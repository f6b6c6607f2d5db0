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


def _transformers_round_trip(model_dir: Path, path: Path, check_tokenizer: bool = True) -> None:
    """transformers' own GGUF reader: the model and tokenizer read from the file alone match the originals."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in _chat_texts(tokenizer) if check_tokenizer else ():
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
        _transformers_round_trip(phi3_dir, path, check_tokenizer=False)


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
