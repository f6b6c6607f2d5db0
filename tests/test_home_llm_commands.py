"""home-llm's documented train.py commands run unchanged, with local tiny models as --base_model.

Only `--max_steps 2 --output_dir TMP --report_to none` are appended, to keep the runs short.
"""

from __future__ import annotations

import json
import shlex

import pytest
from transformers import AutoTokenizer

from chattune.data.formats import load_rows
from chattune.data.masking import ChatMasker, trim_suffix_overlap
from chattune.data.tokenization import tokenize_dataset
from conftest import REPO, chat_rows, make_llama3_like_tokenizer, make_tiny_model, run_script, write_jsonl

PHI3 = """--run_name home-phi3-mini-rev1 --base_model {model} --bf16
    --train_dataset data/home_assistant_train.jsonl --test_dataset data/home_assistant_test.jsonl
    --learning_rate 5e-6 --batch_size 32 --micro_batch_size 8 --gradient_checkpointing --group_by_length
    --ctx_size 2048 --save_steps 100 --save_total_limit 10"""
PHI2 = """--run_name Home-3B-v2_ha-GGUF --base_model {model} --add_pad_token --add_chatml_tokens
    --bf16 --train_dataset data/home_assistant_train.jsonl --learning_rate 1e-5 --save_steps 1000
    --micro_batch_size 2 --gradient_checkpointing --ctx_size 2048 --use_lora --lora_rank 32 --lora_alpha 64
    --lora_modules fc1,fc2,q_proj,v_proj,dense --lora_modules_to_save embed_tokens,lm_head --lora_merge"""
LLAMA3 = """--run_name llamahome-8b-rev1 --base_model {model} --bf16
    --train_dataset data/home_assistant_train.jsonl --test_dataset data/home_assistant_test.jsonl
    --learning_rate 1e-5 --learning_rate_warmup 0.03 --batch_size 64 --epochs 1 --micro_batch_size 2
    --gradient_checkpointing --group_by_length --ctx_size 2048 --save_steps 25 --save_total_limit 20
    --eval_steps 100 --logging_steps 2 --use_lora --lora_rank 32 --lora_alpha 64
    --lora_modules up_proj,down_proj,q_proj,v_proj,o_proj --prefix-ids 128006,78191,128007,271
    --suffix-ids 128009,128006,78191,128007,271"""

# StableLM Zephyr 3B rev10, run under `accelerate launch --config_file fsdp_config.yaml` in home-llm's guide
STABLELM = """--run_name stablehome-3b-rev10 --base_model {model} --bf16
    --train_dataset data/home_assistant_train.jsonl --learning_rate 1e-5 --batch_size 64 --epochs 1
    --micro_batch_size 2 --gradient_checkpointing --group_by_length --ctx_size 2048
    --save_steps 50 --save_total_limit 10 --eval_steps 100 --logging_steps 2"""


@pytest.fixture
def workdir(tmp_path):
    """A folder laid out like a home-llm checkout: data/home_assistant_{train,test}.jsonl."""
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        write_jsonl(tmp_path / "data" / f"home_assistant_{split}.jsonl", chat_rows(16))
    return tmp_path


def run_command(template: str, model, workdir) -> str:
    args = shlex.split(template.format(model=model)) + [
        "--max_steps",
        "2",
        "--output_dir",
        str(workdir / "out"),
        "--report_to",
        "none",
    ]
    result = run_script(str(REPO / "train.py"), *args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_phi3_full_fine_tune_command(tiny_model_dir, workdir):
    run_command(PHI3, tiny_model_dir, workdir)
    assert (workdir / "out" / "models" / "home-phi3-mini-rev1" / "model.safetensors").is_file()


def test_stablelm_command_passes_eval_steps_without_a_test_set(tiny_model_dir, workdir):
    """No evaluation runs without --test_dataset: --eval_steps is one warning line, and the command trains."""
    log = run_command(STABLELM, tiny_model_dir, workdir)
    assert "--eval_steps: no evaluation runs without --test_dataset; ignored" in log
    assert (workdir / "out" / "models" / "stablehome-3b-rev10" / "model.safetensors").is_file()


def test_phi2_lora_command_on_a_base_model_without_template(test_tokenizer_dir, workdir):
    tokenizer = AutoTokenizer.from_pretrained(test_tokenizer_dir)
    tokenizer.chat_template = None
    bare = workdir / "bare-tokenizer"
    tokenizer.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    base = make_tiny_model(bare, workdir / "phi-base", arch="phi")
    run_command(PHI2, base, workdir)
    out = workdir / "out"
    adapter = json.loads((out / "loras" / "Home-3B-v2_ha-GGUF" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"fc1", "fc2", "q_proj", "v_proj", "dense"}
    assert (out / "models" / "Home-3B-v2_ha-GGUF" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-like")
    make_llama3_like_tokenizer(folder / "tok")
    return make_tiny_model(folder / "tok", folder / "model")


def test_llama3_command_with_find_split_era_suffix(llama3_model, workdir):
    log = run_command(LLAMA3, llama3_model, workdir)
    assert "using [128009] as the end of turn" in log
    assert (workdir / "out" / "loras" / "llamahome-8b-rev1" / "adapter_config.json").is_file()


def test_llama3_explicit_ids_label_exactly_what_automatic_masking_labels(llama3_model, workdir):
    """The suffix 128009,128006,... would label the next header; trimmed, the masks equal automatic mode."""
    tokenizer = AutoTokenizer.from_pretrained(llama3_model)
    masker = ChatMasker(tokenizer)
    rows = load_rows(workdir / "data" / "home_assistant_train.jsonl")
    prefix = [128006, 78191, 128007, 271]
    suffix = trim_suffix_overlap(prefix, [128009, 128006, 78191, 128007, 271])
    auto, _ = tokenize_dataset(rows, tokenizer, masker, source="auto", ctx_size=2048)
    explicit, _ = tokenize_dataset(
        rows, tokenizer, masker, source="ids", ctx_size=2048, prefix_ids=prefix, suffix_ids=suffix
    )
    assert auto["labels"] == explicit["labels"]
    assert all(128006 not in [t for t in labels if t != -100] for labels in explicit["labels"])
