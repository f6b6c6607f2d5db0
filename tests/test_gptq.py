"""GPTQ checkpoints (--load_as_gptq): the package check, and LoRA trained and merged on a GPTQ model on the CPU
(gptqmodel's torch kernel), where the gptq extra is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_front_door import refusal

from conftest import CORPUS, TRAIN, chat_rows, generates, run_script, train_argv, write_jsonl

GPTQ_PACKAGES = ("gptqmodel", "optimum")
MISSING = [name for name in GPTQ_PACKAGES if importlib.util.find_spec(name) is None]
needs_gptq = pytest.mark.skipif(bool(MISSING), reason=f"the gptq extra is not installed (no {', '.join(MISSING)})")

QUANTIZE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
base, out, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
tokenizer = AutoTokenizer.from_pretrained(base)
config = GPTQConfig(bits=4, group_size=32, dataset=texts, tokenizer=tokenizer, backend="torch")
model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32, device_map="cpu")
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


@pytest.mark.skipif(not MISSING, reason="gptqmodel and optimum are installed: nothing to refuse")
def test_a_gptq_run_without_the_packages_stops_before_torch_is_imported(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(2))
    argv = train_argv(tmp_path / "no-model-read", data, tmp_path, "--use_lora", "--load_as_gptq")
    status, err, heavy = refusal(TRAIN, *argv)
    assert status == 2 and heavy == []
    (line,) = err.strip().splitlines()
    assert f"--load_as_gptq needs {' and '.join(MISSING)}, not installed: pip install -e '.[gptq]'" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "loras").exists()


@pytest.fixture
def gptq_model_dir(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    """The tiny model quantized to 4 bits by gptqmodel (through transformers and optimum), on the CPU."""
    # one thread: on a busy 2-core machine OpenMP's spinning threads make the tiny matrix products crawl
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "gptq"
    result = run_script("-c", QUANTIZE, str(tiny_model_dir), str(out), *CORPUS[:4])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    return out


@pytest.mark.slow
@needs_gptq
def test_lora_trains_on_a_gptq_model_and_merges_onto_its_weights(gptq_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(1) * 8)
    extra = ["--use_lora", "--load_as_gptq", "--lora_merge", "--learning_rate", "1e-2", "--epochs", "100"]
    flags = {"max_steps": 8, "logging_steps": 1, "save_steps": 8}
    result = run_script(TRAIN, *train_argv(gptq_model_dir, data, tmp_path, *extra, **flags))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPTQ weights (gptqmodel)" in result.stderr
    state = json.loads((tmp_path / "runs" / "run" / "checkpoint-8" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0]

    merged = tmp_path / "models" / "run"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    generates(merged)
    # the merged weights are the GPTQ weights plus the adapter: the same logits as the adapter on the GPTQ model
    prompt = AutoTokenizer.from_pretrained(merged)("Turn on the kitchen light", return_tensors="pt")
    gptq = AutoModelForCausalLM.from_pretrained(
        gptq_model_dir, quantization_config=GPTQConfig(bits=4, backend="torch"), device_map={"": "cpu"}
    )
    with torch.no_grad():
        expected = PeftModel.from_pretrained(gptq, tmp_path / "loras" / "run")(**prompt).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(**prompt).logits
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
