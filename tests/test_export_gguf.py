"""GGUF export: tiny random-weight Llama and Qwen2 models are exported, then read back with transformers'
GGUF loader (which undoes llama.cpp's conventions) and compared with the original model and tokenizer."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest
import torch

from chattune.export.gguf import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    _llama3_rope_factors,
    _load_tokenizer,
    export_gguf,
    main,
)
from chattune.export.gguf_vocab import TokenizerKind
from conftest import REPO, load_llama, make_tiny_model, shared_tokenizer_path, tiny_config

# The Qwen2 fixture's tokenizer has this as an added token that is not special (a USER_DEFINED token in GGUF).
USER_TOKEN = "<tool_call>"

CONVERSATIONS = [
    [
        {"role": "system", "content": f"You control the house. Devices: light.kitchen, fan.bedroom ({i})"},
        {"role": "user", "content": f"Turn on the kitchen light number {i}0, ça va? 日本語 DON'T {USER_TOKEN}"},
        {"role": "assistant", "content": 'Turning it on.\n```homeassistant\n{"service": "light.turn_on"}\n```'},
    ]
    for i in range(4)
]


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir  # conftest's session model: never written into (exports go to --out folders)


@pytest.fixture(scope="module")
def qwen2_dir(test_tokenizer_dir, tmp_path_factory) -> Path:
    """Qwen2 (q/k/v biases) with tied input/output embeddings (as Qwen2.5-0.5B), an added non-special token
    and its embeddings padded to a multiple of 32 as training does: more embedding rows than tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(test_tokenizer_dir, tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([USER_TOKEN])
    tokenizer.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=32, mean_resizing=False)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 32 == 0 and rows > len(tokenizer)
    model.save_pretrained(path)
    return path


def _model_dir(request, arch: str) -> Path:
    return request.getfixturevalue(f"{arch}_dir")


def _batch(tokenizer) -> torch.Tensor:
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = min(len(r) for r in rows)
    return torch.tensor([r[:length] for r in rows])


def _logits_pair(model_dir: Path, gguf_path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, original logits, logits of the model loaded from the GGUF file alone)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = _batch(AutoTokenizer.from_pretrained(model_dir))
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    assert type(exported) is type(original)
    with torch.no_grad():
        return ids, original(ids).logits, exported(ids).logits


def _tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_export_matches_original(arch, request, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = _model_dir(request, arch)
    # Alone in its folder, so the loaders can only read the GGUF (no config.json / tokenizer.json beside it).
    path = export_gguf(model_dir, "f16", out=tmp_path / "alone" / "model.gguf")
    assert path == tmp_path / "alone" / "model.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]  # no temporary file left

    types = _tensor_types(path)
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert ("blk.0.attn_q.bias" in types) == (arch == "qwen2")
    assert ("output.weight" in types) == (arch == "llama")  # the qwen2 fixture has tied embeddings

    ids, original, exported = _logits_pair(model_dir, path)
    assert exported.shape == original.shape
    # F16 keeps 11 significant bits (relative rounding <= 2**-11 ~ 5e-4 per weight); through two layers the
    # logits moved by 0.16% of their standard deviation (measured 2.6e-4 absolute). 1% leaves 6x headroom
    # and still catches a wrong head order (llama q/k), a lost bias or a shifted vocabulary, each of which
    # moves the logits by the order of their whole spread.
    scale = original.std().item()
    assert (exported - original).abs().max().item() < 1e-2 * scale

    config, source = AutoConfig.from_pretrained(path.parent, gguf_file=path.name), AutoConfig.from_pretrained(model_dir)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert getattr(config, key) == getattr(source, key), key
    assert config.max_position_embeddings == source.max_position_embeddings
    assert config.rms_norm_eps == pytest.approx(source.rms_norm_eps)
    assert config.vocab_size == original.shape[-1]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert from_gguf.chat_template == tokenizer.chat_template  # round-trips exactly
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert from_gguf.apply_chat_template(conversation, tokenize=False) == text
        assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"]
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(from_gguf, name) == getattr(tokenizer, name), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_export_is_exact_and_q8_0_keeps_argmax(arch, request, tmp_path):
    model_dir = _model_dir(request, arch)
    f32 = export_gguf(model_dir, "f32", out=tmp_path / "f32" / "model.gguf")
    _, original, exported = _logits_pair(model_dir, f32)
    # No rounding at all: any difference would be a layout error (measured: bit-identical logits).
    torch.testing.assert_close(exported, original, rtol=0, atol=1e-5)

    path = export_gguf(model_dir, "q8_0", out=tmp_path / "q8" / "model.gguf")
    types = _tensor_types(path)
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    assert path.stat().st_size < 0.6 * f32.stat().st_size

    _, original, exported = _logits_pair(model_dir, path)
    scale = original.std().item()
    # Q8_0 rounds every weight to 1/254 of its 32-weight block's largest one; measured: logits move by
    # at most 4.4% of their standard deviation. A random tiny model has near-ties for the top token (top-2
    # margins down to 1e-6), where any rounding may flip the argmax, so the argmax must agree wherever
    # the top-2 margin is over 0.2 std (2x the bound below: such a position cannot flip; ~55% of them),
    # and at 90% of all positions (measured 95.7% for llama, 98.0% for qwen2).
    assert (exported - original).abs().max().item() < 0.1 * scale
    top2 = original.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.2 * scale
    same = exported.argmax(-1) == original.argmax(-1)
    assert clear.float().mean() > 0.4
    assert same[clear].all()
    assert same.float().mean() >= 0.9


def test_q8_0_with_f16_embeddings_stores_only_those_two_apart(test_tokenizer_dir, tmp_path):
    """--embedding_type keeps the token embedding and the output matrix (here untied: both present) at f16 and
    every other matrix at q8_0; the f16 ones hold the weights to f16's rounding."""
    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / "untied", tie_word_embeddings=False)
    assert main([str(model_dir), "--outtype", "q8_0", "--embedding_type", "f16"]) == 0
    path = model_dir / "untied-q8_0.gguf"
    types = _tensor_types(path)
    assert types["token_embd.weight"] == types["output.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    from safetensors.torch import load_file

    embedding = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"]
    stored = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(embedding.shape)
    torch.testing.assert_close(stored, embedding.to(torch.float16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("outtype", ["q6_k", "q4_k_m"])
def test_embedding_type_is_refused_for_llama_cpp_types(test_tokenizer_dir, tmp_path, capsys, outtype):
    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / "m")
    assert main([str(model_dir), "--outtype", outtype, "--embedding_type", "f16"]) == 2
    assert "llama.cpp's quantizer chooses the types" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(model_dir.glob("*.gguf")) and not list(model_dir.glob("*.Modelfile"))


def test_cli_writes_default_path_atomically(test_tokenizer_dir, tmp_path, capsys):
    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / "my-run")
    assert main([str(model_dir), "--outtype", "q8_0"]) == 0
    expected = model_dir / "my-run-q8_0.gguf"
    assert capsys.readouterr().out.strip() == str(expected)
    assert expected.is_file() and not list(model_dir.glob(".*tmp*"))
    reader = gguf.GGUFReader(expected)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the name llama.cpp knows GPT-2's split rule by


def test_metadata_of_padded_vocabulary(qwen2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    reader = gguf.GGUFReader(export_gguf(qwen2_dir, "f32", out=tmp_path / "m.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    rows = next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1]
    assert len(tokens) == len(types) == field("qwen2.vocab_size") == rows > len(tokenizer)
    assert tokens[len(tokenizer)] == f"[PAD{len(tokenizer)}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids(USER_TOKEN)] == gguf.TokenType.USER_DEFINED
    assert types[tokenizer.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("qwen2.attention.head_count_kv") == 2 and field("qwen2.rope.freq_base") == 10000.0
    assert field("tokenizer.chat_template") == tokenizer.chat_template


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_the_file(arch, request, tmp_path):
    """The real consumer, when llama-cpp-python is installed (it is not a dependency: it builds llama.cpp)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _model_dir(request, arch)
    path = export_gguf(model_dir, "f16", out=tmp_path / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = load_llama(path, logits_all=True, n_ctx=512, n_threads=1, verbose=False)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template

    ids = tokenizer(texts[0])["input_ids"]
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    assert logits.shape == original.shape
    # llama.cpp also keeps its KV cache in f16: measured 0.24% of the logits' standard deviation.
    assert np.abs(logits - original).max() < 1e-2 * original.std()


def test_untied_output_kept_when_config_claims_tied(llama_dir, tmp_path):
    """transformers keeps lm_head when the checkpoint stores one that differs from the embedding, even with
    tie_word_embeddings=True; dropping it would make llama.cpp compute with the wrong output matrix."""
    import json
    import shutil

    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "claims-tied"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert "output.weight" in _tensor_types(export_gguf(model_dir, "f16", out=tmp_path / "m.gguf"))


def test_unsupported_architecture_lists_supported_ones(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(tiny_config("gpt2", num_hidden_layers=1)).save_pretrained(model_dir)
    assert main([str(model_dir)]) == 2
    error = capsys.readouterr().err
    assert "GPT2LMHeadModel" in error
    assert all(name in error for name in SUPPORTED_ARCHITECTURES)
    assert not list(model_dir.glob("*.gguf")) and not list(model_dir.glob(".*"))
    with pytest.raises(UnsupportedModelError, match=", ".join(SUPPORTED_ARCHITECTURES)):
        export_gguf(model_dir)

    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert main([str(adapter)]) == 2
    assert "--lora_merge" in capsys.readouterr().err


def test_tokenizer_kind_of_real_tokenizers():
    assert _load_tokenizer(shared_tokenizer_path("qwen2-instruct"))[1] == TokenizerKind("gpt2", "qwen2")
    assert _load_tokenizer(shared_tokenizer_path("gpt2-no-template"))[1] == TokenizerKind("gpt2", "gpt-2")
    # SentencePiece-style: Metaspace "first" writes no "▁" after a special token, as in "<s>[INST]".
    mistral = _load_tokenizer(shared_tokenizer_path("mistral-v1-instruct"))[1]
    assert mistral == TokenizerKind("llama", "default", add_space_prefix=False)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2).float() / 64)
    np.testing.assert_allclose(_llama3_rope_factors(rope, 64, 131072), (plain / scaled).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# An export never destroys: what it must not write is refused before any tensor is converted


def files_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time. Equal before and after: nothing was changed."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _existing_file(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "export" / "home-q8_0.gguf"
    out.parent.mkdir()
    out.write_bytes(b"GGUF shipped yesterday")
    return ["--out", str(out)], f"{out}: exists; pass --overwrite to replace it, or choose another --out"


def _existing_modelfile(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "export" / "home-q8_0.gguf"
    out.parent.mkdir()
    (out.parent / "home-q8_0.Modelfile").write_text("FROM ./home-q8_0.gguf\n# TEMPLATE written by hand\n")
    modelfile = out.parent / "home-q8_0.Modelfile"
    return ["--out", str(out)], f"{modelfile}: exists; pass --overwrite to replace it, or choose another --out"


def _model_weights(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    return _in_model_folder(model_dir, model_dir / "model.safetensors")


def _model_weights_through_a_linked_folder(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    link = tmp_path / "linked"
    link.symlink_to(model_dir)
    return _in_model_folder(model_dir, link / "model.safetensors")


def _in_model_folder(model_dir: Path, out: Path) -> tuple[list[str], str]:
    message = (
        f"{out}: is in the model folder {model_dir} and is not a .gguf file: an export never writes over the "
        "model's own files (weights, config, tokenizer); choose another --out"
    )
    return ["--out", str(out), "--overwrite"], message


def _a_folder(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "exports"
    out.mkdir()
    return ["--out", str(out)], f"{out}: is a folder; --out names the .gguf file to write"


def _under_a_file(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    blocker = tmp_path / "exports"
    blocker.write_text("a file where a folder should be")
    out = blocker / "m.gguf"
    return ["--out", str(out)], f"{out}: cannot be written ({blocker} is a file); choose another --out"


def _read_only_folder(model_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    out = folder / "m.gguf"
    return ["--out", str(out)], f"{out}: cannot be written (Permission denied); choose another --out"


REFUSED = {
    "existing-file": _existing_file,
    "existing-modelfile": _existing_modelfile,
    "model-weights": _model_weights,
    "model-weights-through-a-linked-folder": _model_weights_through_a_linked_folder,
    "a-folder": _a_folder,
    "under-a-file": _under_a_file,
    "read-only-folder": _read_only_folder,
}


@pytest.mark.parametrize("case", REFUSED)
def test_an_export_that_would_destroy_is_refused_before_any_tensor(llama_dir, tmp_path, monkeypatch, capsys, case):
    from chattune.export import gguf as module

    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "home"))
    extra, message = REFUSED[case](model_dir, tmp_path)
    before = files_state(tmp_path)
    monkeypatch.setattr(module, "_write_tensors", lambda *args: pytest.fail("a tensor was converted"))
    status = main([str(model_dir), "--outtype", "q8_0", *extra])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    assert files_state(tmp_path) == before


def test_overwrite_replaces_the_file_and_its_modelfile(llama_dir, tmp_path, capsys):
    extra, _ = _existing_file(llama_dir, tmp_path)
    out = Path(extra[1])
    (out.parent / "home-q8_0.Modelfile").write_text("FROM ./home-q8_0.gguf\n")
    assert main([str(llama_dir), "--outtype", "q8_0", *extra, "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"GGUF") and out.read_bytes() != b"GGUF shipped yesterday"
    assert "TEMPLATE" in (out.parent / "home-q8_0.Modelfile").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["home-q8_0.Modelfile", "home-q8_0.gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_while_llama_cpp_quantizes_stops_it(llama_dir, tmp_path, sig):
    """Sent once llama.cpp's quantizer runs (in its child process): the export stops, its f16 intermediate and its
    partial file are removed, and the line says so. (In the parent, a signal during llama_model_quantize used to be
    swallowed by ctypes in llama.cpp's log callback, and the export finished with status 0.)"""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "home"))
    out = tmp_path / "export" / "home-q4_0.gguf"
    before = files_state(model_dir)
    command = [sys.executable, "-m", "chattune.export.gguf", str(model_dir), "--outtype", "q4_0", "--out", str(out)]
    export = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    quantizer = _wait_for_quantizer(export)
    export.send_signal(sig)
    _, err = export.communicate(timeout=60)

    assert export.returncode == 128 + sig, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"{sig.name}: interrupted while exporting {model_dir} to {out}; {out} was not written (nothing of it is left, "
        f"no f16 intermediate is left); {model_dir} is untouched"
    )
    assert not quantizer.is_running() or quantizer.status() == psutil.STATUS_ZOMBIE
    assert list(out.parent.iterdir()) == [], "a file of the export was left behind"
    assert files_state(model_dir) == before


def _wait_for_quantizer(export: subprocess.Popen) -> psutil.Process:
    """The child process running llama.cpp's quantizer, once it has started."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert export.poll() is None, export.communicate()[1][-3000:]
        for child in psutil.Process(export.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any("llama_model_quantize" in part for part in child.cmdline()):
                    return child
        time.sleep(0.01)
    raise AssertionError("llama.cpp's quantizer never started")
