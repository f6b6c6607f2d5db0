"""YAML recipes: every recipe parses, command-line flags override it, bad files are explained."""

from __future__ import annotations

import pytest
import torch

from chattune.config.flags import parse_flags
from conftest import REPO, tiny_config

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# The architecture (of conftest.TINY_ARCHS) each recipe's base model uses, to check its LoRA module names exist.
ARCHITECTURES = {
    "phi2": "phi",
    "phi3-mini": "phi3",
    "stablelm-zephyr-3b": "stablelm",
    "stablelm2-1.6b": "stablelm",
    "tinyllama": "llama",
    "qwen2-0.5b": "qwen2",
    "llama3-8b-lora": "llama",
    "llama3.2-3b": "llama",
    "smollm2-135m-home": "llama",
}


def test_there_is_a_recipe_per_home_llm_family():
    assert {path.stem for path in RECIPES} == set(ARCHITECTURES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_parses_and_names_real_modules(recipe):
    flags = parse_flags(["--config", str(recipe)])
    assert flags.run_name and flags.base_model and flags.train_dataset
    flags.gradient_accumulation_steps(1)  # the batch arithmetic works
    names = [n for n in (flags.lora_modules or "").split(",") + (flags.lora_modules_to_save or "").split(",") if n]
    if not names:
        return
    from transformers import AutoModelForCausalLM

    config = tiny_config(ARCHITECTURES[recipe.stem], intermediate_size=64, num_hidden_layers=1, num_key_value_heads=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(names) <= present, f"{recipe.name}: {set(names) - present} not in {type(model).__name__}"


@pytest.mark.parametrize("spelling", ["--config {}", "--config={}"])
def test_both_spellings_of_config_read_the_recipe(spelling):
    recipe = str(REPO / "recipes" / "qwen2-0.5b.yaml")
    flags = parse_flags([*spelling.format(recipe).split(" "), "--run_name", "mine"])
    assert flags.run_name == "mine" and flags.lora_rank == 32 and flags.base_model == "Qwen/Qwen2-0.5B-Instruct"


@pytest.mark.parametrize("argv", [["--config"], ["--config="], ["--config=a.yaml", "--config", "b.yaml"]])
def test_config_without_a_file_or_twice_is_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_flags([*argv, "--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"])
    assert "--config" in capsys.readouterr().err


def test_command_line_overrides_the_recipe():
    recipe = str(REPO / "recipes" / "qwen2-0.5b.yaml")
    flags = parse_flags(["--config", recipe, "--learning_rate", "3e-4", "--run_name", "mine"])
    assert flags.learning_rate == 3e-4 and flags.run_name == "mine" and flags.lora_rank == 32


@pytest.mark.parametrize(
    "text,message",
    [
        ("run_name: r\nlora_rnak: 8\n", "unknown key 'lora_rnak'; did you mean --lora_rank?"),
        ("run_name: r\nbatch_size: [1\n", ":3:1: invalid YAML"),
        ("run_name: r\nlora_rank: eight\n", "--lora-rank: invalid int value: 'eight'"),
    ],
)
def test_bad_recipes_are_explained(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse_flags(["--config", str(path), "--base_model", "m", "--train_dataset", "d.jsonl"])
    assert message in capsys.readouterr().err
