"""Bad inputs to train.py are refused before the work they would spoil: exit status 2, one line that names the flag,
file or row and what to do, and nothing written. What would silently train or save the wrong thing (old checkpoints
kept by --overwrite_output_dir, a LoRA resumed on another base, another batch on resume, a longer schedule resumed at
lr 0) is refused or handled. docs/training.md's "What can go wrong" lists each case with its test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from chattune.commands import train as run
from conftest import TRAIN, chat_rows, make_tiny_model, run_script, train_argv, write_jsonl


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`, with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def forbidden(work: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{work} started before the bad input was refused")

    return fail


def refused(argv: list[str], capsys, monkeypatch, before: str = "data") -> str:
    """Run train.py's main in this process with `argv`; it must exit with status 2 before `before` (data
    preparation, or the model) is touched. Returns stderr."""
    monkeypatch.setattr(run, "load_model", forbidden("model loading"))
    if before == "data":
        monkeypatch.setattr(run, "read_data", forbidden("data preparation"))
    try:
        status = run.main(argv)
    except SystemExit as exit_info:  # argparse's error for a flag value refused while parsing
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, test_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "m"}))
    pairs = [{"prompt": f"turn on light {i}", "chosen": "Done.", "rejected": "No."} for i in range(3)]
    pairs.append({"prompt": "turn on the fan", "chosen": "Done."})  # no rejected answer: read as null
    return {
        "data": write_jsonl(root / "train.jsonl", chat_rows(8)),
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
        "tokenizer": test_tokenizer_dir,
        "adapter": adapter,
        "a_file": write_jsonl(root / "a_file.jsonl", []),
        "gpt2": make_tiny_model(test_tokenizer_dir, root / "gpt2", arch="gpt2"),
    }


CASES = {  # id: (flags after the defaults, the message, what must not have started)
    "lora-merge-without-lora": (["--lora_merge"], "--lora_merge merges a LoRA adapter into its base: add --use_lora"),
    "ctx-size-negative": (["--ctx_size=-5"], "--ctx_size must be a number of tokens of at least 1, not -5"),
    "ctx-size-zero": (["--ctx_size", "0"], "--ctx_size must be a number of tokens of at least 1, not 0"),
    "epochs-zero": (["--epochs", "0"], "--epochs 0 trains nothing"),
    "run-name-escapes": (["--run_name", "../../x"], "--run_name '../../x' must be a plain folder name"),
    "run-name-path": (["--run_name", "a/b"], "--run_name 'a/b' must be a plain folder name"),
    "learning-rate-negative": (["--learning_rate=-1e-4"], "--learning_rate must not be negative, not -0.0001"),
    "unknown-schedule": (["--learning_rate_schedule", "cosinus"], "'cosinus' is not one of transformers' schedules"),
    "unknown-dpo-loss": (["--dpo", "--dpo_loss", "sigmoidal"], "--dpo_loss 'sigmoidal' is not a TRL DPO loss"),
    "unknown-attention": (["--attn_implementation", "flash"], "--attn_implementation 'flash' is not an attention"),
    "lora-rank-zero": (["--use_lora", "--lora_rank", "0"], "--lora_rank must be at least 1, not 0"),
    "lora-dropout-negative": (
        ["--use_lora", "--lora_dropout=-0.5"],
        "--lora_dropout is a probability in [0, 1), not -0.5",
    ),
    "lora-dropout-one-or-more": (["--use_lora", "--lora_dropout", "1.5"], "--lora_dropout is a probability in [0, 1)"),
    "embedding-type-without-export": (
        ["--export_embedding_type", "f16"],
        "--export_embedding_type needs --export_gguf (the GGUF type of the other weights)",
    ),
    "embedding-type-for-a-k-quant": (
        ["--export_gguf", "q6_k", "--export_embedding_type", "f16"],
        "--export_embedding_type: an embedding type (f16) applies to the types chattune writes",
    ),
    "same-source-twice": (
        ["--train_dataset", "{data}", "{root}/../{root_name}/train.jsonl"],
        "--train_dataset: {data} and {root}/../{root_name}/train.jsonl are the same source, so each of its rows "
        "would be used twice; give it once, or give weights",
        "model",
    ),
    "missing-template": (
        ["--prompt_template_file", "{root}/none.jinja"],
        "--prompt_template_file {root}/none.jinja: no",
    ),
    "output-dir-is-a-file": (["--output_dir", "{a_file}"], "--output_dir {a_file}: {a_file} is a file, not a folder"),
    "tokenizer-as-base": (["--base_model", "{tokenizer}"], "--base_model {tokenizer} is not a model folder"),
    "adapter-as-base": (["--base_model", "{adapter}"], "--base_model {adapter} is a LoRA adapter, not a model"),
    "missing-local-base": (["--base_model", "{root}/no/model"], "--base_model {root}/no/model: no such model folder"),
    "missing-relative-base": (["--base_model", "./no/such/model"], "--base_model ./no/such/model: no such model"),
    "gguf-export-refused": (
        ["--base_model", "{gpt2}", "--export_gguf", "f16"],
        "cannot export architecture GPT2LMHeadModel to GGUF",
    ),
    "null-preference-side": (
        ["--dpo", "--train_dataset", "{pairs}"],
        "{pairs}: row 4: rejected missing or null; every row needs prompt, chosen, rejected",
        "model",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_before_work(case, inputs, tiny_model_dir, tmp_path, capsys, monkeypatch):
    flags, message, *before = CASES[case]
    places = {**inputs, "root": inputs["data"].parent, "root_name": inputs["data"].parent.name}
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "keep.txt").write_text("an earlier result")
    before_run = snapshot(tmp_path), snapshot(places["root"])  # the outputs, and the inputs (a_file is one)
    argv = train_argv(tiny_model_dir, inputs["data"], out, *(flag.format(**places) for flag in flags))
    err = refused(argv, capsys, monkeypatch, *before)
    assert message.format(**places) in err.strip().splitlines()[-1], "the refusal is not the last line"
    assert (snapshot(tmp_path), snapshot(places["root"])) == before_run


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (see the /proc case below)")
def test_read_only_output_folder_is_refused(tiny_model_dir, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        err = refused(train_argv(tiny_model_dir, inputs["data"], out), capsys, monkeypatch)
    finally:
        out.chmod(0o755)
    assert f"cannot write in {out} (Permission denied)" in err and not any(out.iterdir())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nobody can make a folder")
def test_an_output_folder_nobody_can_write_is_refused(tiny_model_dir, inputs, capsys, monkeypatch):
    err = refused(train_argv(tiny_model_dir, inputs["data"], "/proc/chattune-test"), capsys, monkeypatch)
    assert "error: --output_dir /proc/chattune-test: cannot write in /proc" in err


def test_find_split_missing_template_is_one_line(tiny_model_dir, capsys):
    from chattune.commands import find_split as find_split_cli

    assert find_split_cli.main([str(tiny_model_dir), "--template", "missing.jinja"]) == 2
    assert "error: --template missing.jinja: No such file or directory" in capsys.readouterr().err


def test_an_empty_merge_file_is_refused_before_generating(tmp_path, capsys):
    from chattune.domains.homeassistant.datagen import cli

    empty = tmp_path / "alpaca.jsonl"
    empty.write_text("\n")
    assert cli.main(["--train", "--merge", str(empty), "--output_dir", str(tmp_path / "data")]) == 2
    assert f"{empty}: the merge file holds no records" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_empty_trained_replies_are_counted_in_a_warning(tiny_model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from chattune.data.formats import load_rows
    from chattune.data.masking import ChatMasker
    from chattune.data.tokenization import tokenize_dataset

    rows = chat_rows(4)
    rows[2]["conversations"][2]["value"] = "  "
    rows[3]["conversations"][2]["value"] = ""
    rows[3]["conversations"][2]["weight"] = 0  # kept as context only: not trained, so not counted
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenize_dataset(load_rows(data), tokenizer, ChatMasker(tokenizer), source=str(data), ctx_size=512)
    assert f"{data}: 1 trained assistant reply is empty (first in row 3)" in caplog.text


def test_the_summary_leaves_out_tokens_a_trainer_did_not_count():
    from types import SimpleNamespace

    from chattune.training.safety.progress import summary

    args = SimpleNamespace(metric_for_best_model=None, load_best_model_at_end=False)
    counted = SimpleNamespace(global_step=2, num_input_tokens_seen=88, log_history=[], best_global_step=None)
    assert "tokens seen:    88" in summary(counted, args, 0, [], None)
    uncounted = SimpleNamespace(global_step=2, num_input_tokens_seen=0, log_history=[], best_global_step=None)
    assert "tokens seen" not in summary(uncounted, args, 0, [], None)


# ------------------------------------------------------------------------------------------ resuming a LoRA run

LORA = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8"]
STEPS = {"learning_rate": "1e-3", "logging_steps": 1, "save_steps": 2}


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA run of 2 steps, checkpoint-2 saved."""
    root = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(root / "train.jsonl", chat_rows(16))
    result = run_script(TRAIN, *train_argv(tiny_model_dir, data, root / "out", *LORA, max_steps=2, **STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "out": root / "out", "checkpoint": root / "out" / "runs" / "run" / "checkpoint-2"}


@pytest.mark.slow
def test_checkpoints_leave_no_staging_folder_behind(lora_run):
    assert lora_run["checkpoint"].is_dir() and not (lora_run["out"] / "runs" / "run" / ".staging").exists()


RESUME_CASES = {  # id: (how the base model differs, flags, message)
    "same-shape-other-weights": (
        {"seed": 1},
        [],
        "was trained with other settings: --base_model {base} -> {other} (weights {weights} -> {}); resume with "
        "--base_model {base}",
    ),
    "other-shape": (
        {"hidden_size": 32},
        [],
        "was trained with other settings: --base_model {base} -> {other} (hidden_size 64 -> 32",
    ),
    "other-batch-size": (None, ["--batch_size", "8"], "was trained with --batch_size 4, this run asks for 8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_refuses_another_base_or_batch(
    case, lora_run, tiny_model_dir, test_tokenizer_dir, tmp_path, capsys, monkeypatch
):
    from chattune.training.safety.resume import base_identity

    change, flags, message = RESUME_CASES[case]
    base = make_tiny_model(test_tokenizer_dir, tmp_path / "other", **change) if change else tiny_model_dir
    before = snapshot(lora_run["out"])
    argv = train_argv(base, lora_run["data"], lora_run["out"], *LORA, "--resume_from_checkpoint", "latest", *flags)
    err = refused(argv, capsys, monkeypatch)
    expected = message.format(
        base_identity(str(base))["weights"],
        base=tiny_model_dir.resolve(),
        other=base.resolve(),
        weights=base_identity(str(tiny_model_dir))["weights"],
    )
    assert f"error: {lora_run['checkpoint']} " in err and expected in err
    assert snapshot(lora_run["out"]) == before


@pytest.mark.slow
def test_resume_accepts_the_same_base_moved_elsewhere(lora_run, tiny_model_dir, tmp_path):
    from chattune.training.safety.resume import check_same_base

    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved")
    check_same_base(str(moved), lora_run["checkpoint"], None)  # no error: same shape, same weights


@pytest.mark.slow
def test_resume_with_the_same_batch_in_other_micro_batches_is_a_warning(lora_run, tiny_model_dir, caplog):
    from chattune.config.flags import parse_flags
    from chattune.training.safety.resume import check_same_batch

    argv = train_argv(tiny_model_dir, lora_run["data"], lora_run["out"], *LORA, micro_batch_size=1)
    check_same_batch(parse_flags(argv), lora_run["checkpoint"])  # no error: the same 4 examples make each step
    assert "trained with micro-batches of 2 on 1 process(es), this run uses 1 on 1" in caplog.text


@pytest.mark.slow
def test_overwrite_output_dir_removes_the_old_runs_checkpoints(lora_run, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    for step in (5, 10):  # an earlier, longer run of the same name
        shutil.copytree(lora_run["checkpoint"], run_dir / f"checkpoint-{step}")
    argv = train_argv(
        tiny_model_dir, lora_run["data"], tmp_path, *LORA, "--overwrite_output_dir", "--save_steps", "1", max_steps=1
    )
    result = run_script(TRAIN, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--overwrite_output_dir: removed the 2 checkpoint(s) of the previous run" in result.stderr
    assert f"{run_dir}: checkpoint-5, checkpoint-10" in result.stderr
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.mark.slow
def test_a_longer_schedule_resumes_on_its_own_learning_rate(lora_run, tiny_model_dir, tmp_path):
    """Resuming a finished 2-step cosine run with --max_steps 4: step 3 runs at the 4-step schedule's rate for it
    (half the peak), not at the 2-step schedule's last rate, 0."""
    out = tmp_path / "out"
    shutil.copytree(lora_run["out"], out)
    argv = train_argv(
        tiny_model_dir, lora_run["data"], out, *LORA, "--resume_from_checkpoint", "latest", max_steps=4, **STEPS
    )
    result = run_script(TRAIN, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step 2 of 4: learning rate 0.0005 from this run's schedule" in result.stderr
    state = json.loads((out / "runs" / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert rates[3] == pytest.approx(5e-4) and rates[4] > 0
