"""Faults in the input that were silent, hung or ended in a traceback: rows past the first 1,024 that the chat template
cannot take, the same pairing in evaluate.py, a bad row in a worker of the tokenizing pool (and the hang it caused),
flags that did nothing or failed late, a full disk at the first checkpoint, the data generator's output folder.

Each case asserts the exit status, the last line on stderr and that no output changed. docs/training.md ("What can
go wrong") lists each with its test."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_faults import digest
from test_tool_calls import calendar_rows

from chattune.cli import signals_raise
from chattune.commands import evaluate, train
from chattune.data.formats import DataError, load_rows
from chattune.data.masking import ChatMasker
from chattune.data.tokenization import tokenize_dataset
from conftest import REPO, chat_rows, train_argv, write_jsonl
from templates import GEMMA, MISTRAL

FAR = 1100  # past the 1,024 rows the template checks used to read


def plain_rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Lights on {i}"}, {"role": "assistant", "content": "On."}]}
        for i in range(n)
    ]


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def forbid(monkeypatch, module, name: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran before the bad input was refused")

    monkeypatch.setattr(module, name, fail)


def refused_by(main, argv: list[str], capsys) -> str:
    """Run an entry point's main in this process: status 2, and the last stderr line (an `error: ...` line)."""
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's refusal of a flag value
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    return last_line(err)


# Every row is checked against the template ------------------------------------------------------------------------


def far_row_cases(tmp_path: Path) -> dict[str, tuple[list[dict], list[str], str]]:
    gemma = tmp_path / "gemma.jinja"
    gemma.write_text(GEMMA)
    with_system = {"messages": [{"role": "system", "content": "You control the house."}, *plain_rows(1)[0]["messages"]]}
    return {  # rows, extra flags, the refusal after "error: <file>: row 1100"
        "tool-call": (
            [*plain_rows(FAR - 1), calendar_rows(1)[0]],
            [],
            " has tool calls, but the chat template does not write an assistant turn's tool_calls; give a template",
        ),
        "system-turn": (
            [*plain_rows(FAR - 1), with_system],
            ["--prompt_template_file", str(gemma)],
            ": the chat template rejects this conversation (System role not supported); for a template without a "
            "system role",
        ),
    }


@pytest.mark.parametrize("case", ["tool-call", "system-turn"])
def test_a_row_past_the_first_1024_that_the_template_cannot_take_is_refused(
    case, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    rows, extra, refusal = far_row_cases(tmp_path)[case]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    forbid(monkeypatch, train, "load_model")
    line = refused_by(train.main, train_argv(tiny_model_dir, data, out, *extra), capsys)
    assert line.startswith(f"error: {data}: row {FAR}{refusal}"), line
    assert not out.exists()


def test_evaluate_refuses_tool_call_rows_on_a_template_without_tool_calls(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """train.py's refusal for the same pairing: scored anyway, the prompts would lose the tools and earlier calls."""
    data = write_jsonl(tmp_path / "calendar.jsonl", [*plain_rows(2), *calendar_rows(2)])
    forbid(monkeypatch, evaluate, "open_model")
    before = digest(tiny_model_dir)
    line = refused_by(evaluate.main, [str(tiny_model_dir), "--test_dataset", str(data)], capsys)
    assert line.startswith(
        f"error: {data}: row 3 has tool calls, but the chat template does not write an assistant turn's tool_calls"
    ), line
    assert digest(tiny_model_dir) == before, "results were written"


def test_evaluate_refuses_a_test_row_the_template_rejects(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "test.jsonl", chat_rows(2))  # a system turn in every row
    gemma = tmp_path / "gemma.jinja"
    gemma.write_text(GEMMA)
    forbid(monkeypatch, evaluate, "open_model")
    argv = [str(tiny_model_dir), "--test_dataset", str(data), "--prompt_template_file", str(gemma)]
    line = refused_by(evaluate.main, argv, capsys)
    assert line.startswith(f"error: {data}: row 1: the chat template rejects this conversation"), line


def test_a_template_that_drops_the_tool_list_is_refused(test_tokenizer, tmp_path):
    masker = ChatMasker(test_tokenizer, MISTRAL)  # writes no tool list
    rows = [*plain_rows(3), {**plain_rows(1)[0], "tools": [{"type": "function", "function": {"name": "f"}}]}]
    data = load_rows(write_jsonl(tmp_path / "tools.jsonl", rows))
    with pytest.raises(DataError, match=r"tools: row 4 has a tool list, but the chat template does not write the"):
        tokenize_dataset(data, test_tokenizer, masker, source="tools", ctx_size=256)


# The tokenizing pool ------------------------------------------------------------------------------------------


def roles_out_of_order(n: int, bad: int) -> list[dict]:
    """Rows Mistral's template takes, but row `bad` (from 1): two user turns in a row, which it raises on."""
    rows = plain_rows(n)
    rows[bad - 1]["messages"].insert(0, {"role": "user", "content": "hello?"})
    return rows


def test_a_row_the_template_rejects_in_a_worker_is_named(test_tokenizer, tmp_path):
    masker = ChatMasker(test_tokenizer, MISTRAL)
    data = load_rows(write_jsonl(tmp_path / "rows.jsonl", roles_out_of_order(300, 281)))
    with pytest.raises(DataError, match=r"^rows: row 281: the chat template rejects this conversation \(roles must"):
        tokenize_dataset(data, test_tokenizer, masker, source="rows", ctx_size=256, num_proc=3)


def _worker_handlers(batch: dict, indices: list[int]) -> dict:
    names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored"}
    handlers = [names.get(signal.getsignal(sig), "python") for sig in (signal.SIGINT, signal.SIGTERM)]
    return {"handlers": [f"{os.getpid()}:{'/'.join(handlers)}"] * len(indices)}


def test_tokenizing_workers_start_with_the_default_signal_handlers(tmp_path):
    """chattune's handlers raise into the parent's main loop; a worker that inherited them ignored the pool's
    SIGTERM while it sat in native code, and the parent hung in terminate()/join()."""
    from datasets import Dataset

    rows = Dataset.from_list([{"n": i} for i in range(400)])
    with signals_raise():
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        seen = rows.map(_worker_handlers, batched=True, with_indices=True, num_proc=3, batch_size=50)["handlers"]
    workers = {entry.split(":")[0] for entry in seen}
    assert len(workers) == 3 and str(os.getpid()) not in workers
    assert {entry.split(":")[1] for entry in seen} == {"default/default"}


STRESS = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from chattune.cli import entry_point
    from chattune.data.formats import load_rows
    from chattune.data.masking import ChatMasker
    from chattune.data.tokenization import tokenize_dataset
    from templates import MISTRAL
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
    rows = load_rows({data!r})

    @entry_point
    def tokenize():
        tokenize_dataset(rows, tokenizer, ChatMasker(tokenizer, MISTRAL), source="rows", ctx_size=256, num_proc=3)
        return 0

    outcomes = []
    for run in range({runs}):
        log = os.path.join({logs!r}, f"run-{{run}}.log")
        child = os.fork()
        if child == 0:  # one run of the tokenization step, as train.py runs it
            os.setsid()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os._exit(tokenize())
        deadline = time.monotonic() + {timeout}
        while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.killpg(child, 9)
            os.waitpid(child, 0)
            outcomes.append({{"run": run, "status": "hung"}})
            continue
        lines = open(log).read().strip().splitlines() or [""]
        outcomes.append({{"run": run, "status": os.waitstatus_to_exitcode(done[1]), "last": lines[-1]}})
    print(json.dumps(outcomes))
    """
)


@pytest.mark.slow
def test_a_bad_row_in_a_worker_ends_every_run_with_status_2_never_a_hang(test_tokenizer_dir, tmp_path):
    """100 runs of the tokenization step alone (3 workers, the bad row at 281 of 300), each forked from one warm
    process and given 60 s: every one ends with status 2 and the row named as its last line."""
    data = write_jsonl(tmp_path / "rows.jsonl", roles_out_of_order(300, 281))
    logs = tmp_path / "logs"
    logs.mkdir()
    script = STRESS.format(
        tests=str(REPO / "tests"),
        tokenizer=str(test_tokenizer_dir),
        data=str(data),
        logs=str(logs),
        runs=100,
        timeout=60,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    expected = "error: rows: row 281: the chat template rejects this conversation (roles must alternate)"
    wrong = [o for o in outcomes if o["status"] != 2 or o.get("last") != expected]
    assert len(outcomes) == 100 and wrong == [], wrong[:5]


# Flags that did nothing or failed late ------------------------------------------------------------------------


def test_tool_call_format_on_block_format_test_data_is_refused(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "test.jsonl", chat_rows(2))
    forbid(monkeypatch, evaluate, "open_model")
    argv = [str(tiny_model_dir), "--test_dataset", str(data), "--tool_call_format", "hermes"]
    assert refused_by(evaluate.main, argv, capsys) == (
        f"error: --tool_call_format hermes: {data} is scored by the homeassistant task, which does not read tool "
        "calls; drop the flag, or give tool-calling test data"
    )


def test_compare_scores_again_after_the_template_or_the_tool_call_format_changed(tmp_path):
    """The reuse key of stored results holds both; the same settings keep the same key."""
    template = tmp_path / "tools.jinja"
    template.write_text((REPO / "recipes" / "templates" / "chatml_tools.jinja").read_text())
    task = evaluate.resolve_task("tool_calls", [])

    def key(**changes) -> dict:
        return evaluate._scoring_key(evaluate.Settings(model="m", **changes), task)

    assert key(prompt_template_file=str(template)) == key(prompt_template_file=str(template))
    assert key(tool_call_format="hermes") == key(tool_call_format="hermes")
    first = key(prompt_template_file=str(template))
    template.write_text(template.read_text() + "\n")  # the same file, edited
    assert len({json.dumps(k) for k in (key(), first, key(prompt_template_file=str(template)))}) == 3
    assert key(tool_call_format="hermes") != key(tool_call_format="mistral") != key()


@pytest.mark.slow
def test_a_gguf_scored_in_transformers_writes_its_results_beside_the_file(tiny_model_dir, tmp_path, monkeypatch):
    from chattune.export.gguf import export_gguf

    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "cache"))
    gguf_file = export_gguf(tiny_model_dir, outtype="f32", out=tmp_path / "models" / "tiny.gguf")
    data = write_jsonl(tmp_path / "test.jsonl", chat_rows(2))
    argv = [str(gguf_file), "--gguf_runtime", "transformers", "--test_dataset", str(data), "--max_new_tokens", "2"]
    assert evaluate.main(argv) == 0
    assert (tmp_path / "models" / "tiny-eval" / "eval_results.json").is_file()
    assert not list((tmp_path / "cache").rglob("eval_results.json")), "results went into the conversion cache"


# A full disk at the first checkpoint --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_at_the_first_checkpoint_leaves_nothing_and_the_rerun_works(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "out"
    argv = [str(REPO / "train.py"), *train_argv(tiny_model_dir, data, out, max_steps=2, save_steps=1)]
    limit = (tiny_model_dir / "model.safetensors").stat().st_size // 2  # the first weights file cannot be written

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    full = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert full.returncode == 2, full.stderr[-3000:]
    checkpoint = out / "runs" / "run" / "checkpoint-1"
    assert last_line(full.stderr).startswith(f"error: disk full while writing {checkpoint} ("), full.stderr[-2000:]
    assert last_line(full.stderr).endswith(
        "there is no earlier checkpoint; free some space, then run the same command again"
    )
    assert not (out / "runs" / "run" / ".staging").exists() and not (out / "models").exists()
    again = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "models" / "run" / "model.safetensors").is_file()


# The data generator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("place", ["a-file", "under-a-file"])
def test_the_data_generator_refuses_an_output_folder_it_cannot_write(tmp_path, capsys, place):
    from chattune.domains.homeassistant.datagen import cli

    blocker = tmp_path / "data"
    blocker.write_text("a file where the folder should be")
    output_dir = blocker if place == "a-file" else blocker / "generated"
    line = refused_by(cli.main, ["--train", "--output_dir", str(output_dir)], capsys)
    assert line == (
        f"error: --output_dir {output_dir}: cannot write the files there ({blocker} is a file); pass another "
        "--output_dir"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["data"] and blocker.read_text().startswith("a file")
