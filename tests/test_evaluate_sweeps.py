"""evaluate.py over several models: --all_checkpoints sweeps, reuse and --overwrite, incomplete checkpoints,
comparison tables; and the text, latency and device-count metrics against their libraries."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from chattune.domains import metrics
from chattune.domains.homeassistant.reply_format import format_reply
from chattune.domains.homeassistant.scoring import (
    METRIC_KEYS,
    aggregate,
    device_bucket,
    devices_in_prompt,
    score_example,
    summarize,
)
from chattune.evaluation.report import RESULTS_FILE
from conftest import TRAIN, chat_rows, run_script, train_argv, write_jsonl

KITCHEN_ON = {"service": "light.turn_on", "target_device": "light.kitchen"}


def device_lines(n: int) -> list[str]:
    return [f"light.lamp_{i} 'Lamp {i}' = off" for i in range(n)]


def home_rows(device_counts: tuple[int, ...] = (2, 6)) -> list[dict]:
    """Test rows whose system prompts list `device_counts` devices, one line each as the generator writes them."""
    rows = []
    for i, count in enumerate(device_counts):
        system = "\n".join(["You control the house.", "Services: light.turn_on()", "Devices:", *device_lines(count)])
        answer = format_reply("Turning on the kitchen light.", [KITCHEN_ON]) if i % 2 else "The lamp is off."
        conversation = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Turn on lamp {i}"},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"conversations": conversation, "language": "english", "kind": f"k{i % 2}"})
    return rows


@pytest.fixture
def run_layout(tiny_model_dir, tmp_path) -> Path:
    """train.py's layout, built by hand: runs/r/checkpoint-{2,3,10} and the final models/r, all the tiny model."""
    run_dir = tmp_path / "out" / "runs" / "r"
    for step in (2, 3, 10):
        shutil.copytree(tiny_model_dir, run_dir / f"checkpoint-{step}")
    shutil.copytree(tiny_model_dir, tmp_path / "out" / "models" / "r")
    (run_dir / ".staging").mkdir()  # a save's leftovers are not a checkpoint
    return run_dir


@pytest.fixture
def test_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "test.jsonl", home_rows())


def evaluate(capsys, *args: str) -> dict:
    """evaluate.py in process (the models are tiny): the --json result."""
    from chattune.commands.evaluate import main

    assert main([*args, "--max_new_tokens", "4", "--device", "cpu", "--dtype", "float32", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def results_mtimes(run_dir: Path) -> dict[str, int]:
    found = [*run_dir.glob(f"checkpoint-*/{RESULTS_FILE}"), run_dir.parents[1] / "models" / "r" / RESULTS_FILE]
    return {str(path): path.stat().st_mtime_ns for path in found}


# --- sweeps ----------------------------------------------------------------------------------------------


def test_all_checkpoints_gives_one_row_per_checkpoint_and_the_final_folder(run_layout, test_file, capsys):
    table = evaluate(capsys, str(run_layout), "--all_checkpoints", "--test_dataset", str(test_file))
    rows = table["rows"]
    assert [row["model"] for row in rows] == ["checkpoint-2", "checkpoint-3", "checkpoint-10", "models/r"]
    assert [row["step"] for row in rows] == [2, 3, 10, None] and rows[-1]["final"]
    assert table["skipped"] == [] and not any(row["reused"] for row in rows)
    for row in rows:
        stored = json.loads((Path(row["path"]) / RESULTS_FILE).read_text())
        assert {key: stored["summary"][key] for key in METRIC_KEYS} == {key: row[key] for key in METRIC_KEYS}
        assert set(stored["summary"]["by_devices"]) == {"1-4", "5-8"}
        assert stored["summary"]["latency_mean_s"] > 0
    with (run_layout / "eval_table.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [line["model"] for line in written] == [row["model"] for row in rows]
    assert float(written[0]["edit_distance"]) == pytest.approx(rows[0]["edit_distance"])
    assert json.loads((run_layout / "eval_table.json").read_text())["rows"] == rows


def test_stored_results_are_reused_unless_overwrite(run_layout, test_file, tmp_path, capsys):
    for step in (3, 10):  # one checkpoint and the final folder are enough here
        shutil.rmtree(run_layout / f"checkpoint-{step}")
    sweep = [str(run_layout), "--all_checkpoints", "--test_dataset", str(test_file)]
    first = evaluate(capsys, *sweep)
    written = results_mtimes(run_layout)
    assert len(written) == 2

    again = evaluate(capsys, *sweep)
    assert all(row["reused"] for row in again["rows"]) and results_mtimes(run_layout) == written
    assert [row["rougeL"] for row in again["rows"]] == [row["rougeL"] for row in first["rows"]]

    overwritten = evaluate(capsys, *sweep, "--overwrite")
    assert not any(row["reused"] for row in overwritten["rows"])
    assert all(results_mtimes(run_layout)[path] != mtime for path, mtime in written.items())

    other_test = write_jsonl(tmp_path / "other.jsonl", home_rows((1, 9, 20)))
    changed = evaluate(capsys, str(run_layout), "--all_checkpoints", "--test_dataset", str(other_test))
    assert not any(row["reused"] for row in changed["rows"])  # another test set is scored, not reused
    assert all(row["n_examples"] == 3 for row in changed["rows"])


def test_incomplete_checkpoints_are_skipped_with_a_warning(run_layout, test_file, capsys, caplog):
    truncated = run_layout / "checkpoint-3" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])  # killed mid-write
    (run_layout / "checkpoint-10" / "model.safetensors").unlink()  # killed before the weights
    (run_layout / "checkpoint-2" / "tokenizer.json").unlink()  # killed after the weights, before the tokenizer
    with caplog.at_level(logging.WARNING, logger="chattune.evaluate"):
        table = evaluate(capsys, str(run_layout), "--all_checkpoints", "--test_dataset", str(test_file))
    assert [row["model"] for row in table["rows"]] == ["models/r"]
    assert sorted(Path(s["model"]).name for s in table["skipped"]) == ["checkpoint-10", "checkpoint-2", "checkpoint-3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-3" in w and "truncated" in w for w in warnings)
    assert any("checkpoint-10" in w and "no model weights" in w for w in warnings)
    assert any("checkpoint-2" in w and "tokenizer" in w for w in warnings)
    written = json.loads((run_layout / "eval_table.json").read_text())
    assert len(written["rows"]) == 1 and len(written["skipped"]) == 3


def test_run_without_checkpoints_or_final_folder_is_refused(run_layout, tmp_path, test_file, capsys):
    from chattune.commands.evaluate import main

    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert main([str(tmp_path / "runs" / "empty"), "--all_checkpoints", "--test_dataset", str(test_file)]) == 2
    error = capsys.readouterr().err
    assert "no checkpoint-N folder" in error and str(tmp_path / "models" / "empty") in error
    model_folder = run_layout.parents[1] / "models" / "r"  # a final folder is not a run folder
    assert main([str(model_folder), "--all_checkpoints", "--test_dataset", str(test_file)]) == 2
    assert "not in a runs/ folder" in capsys.readouterr().err


def test_several_models_make_one_comparison_table(tiny_model_dir, test_file, tmp_path, capsys):
    base, tuned = (shutil.copytree(tiny_model_dir, tmp_path / name / "model") for name in ("base", "tuned"))
    out = tmp_path / "results"
    table = evaluate(capsys, str(base), str(tuned), "--test_dataset", str(test_file), "--output_dir", str(out))
    assert [row["model"] for row in table["rows"]] == ["base/model", "tuned/model"]
    assert [row["step"] for row in table["rows"]] == [None, None]
    for label in ("base/model", "tuned/model"):  # with --output_dir, each model's results go below it
        assert (out / label / RESULTS_FILE).is_file()
    assert not (base / RESULTS_FILE).exists()
    assert len(json.loads((out / "eval_table.json").read_text())["rows"]) == 2


def test_a_named_model_that_is_incomplete_is_an_error_before_any_model_loads(tiny_model_dir, tmp_path, capsys):
    from chattune.commands.evaluate import main

    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    data = write_jsonl(tmp_path / "test.jsonl", home_rows())
    assert main([str(tiny_model_dir), str(broken), "--test_dataset", str(data)]) == 2
    assert "broken/model.safetensors" in capsys.readouterr().err
    assert not (tiny_model_dir / RESULTS_FILE).exists()


def test_a_truncated_torch_checkpoint_is_incomplete(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from chattune.models.errors import IncompleteWeightsError
    from chattune.models.folders import inspect_model_folder

    folder = shutil.copytree(tiny_model_dir, tmp_path / "bin")
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    assert inspect_model_folder(folder).kind == "model"
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompleteWeightsError, match="pytorch_model.bin: truncated"):
        inspect_model_folder(folder)


@pytest.mark.slow
def test_all_checkpoints_of_a_real_lora_run(tiny_model_dir, tmp_path):
    """train.py's own layout: three adapter checkpoints and loras/run give 3+1 rows."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    argv = train_argv(
        tiny_model_dir,
        data,
        tmp_path,
        "--use_lora",
        max_steps=6,
        save_steps=2,
        save_total_limit=3,
        learning_rate="1e-3",
    )
    trained = run_script(TRAIN, *argv)
    assert trained.returncode == 0, trained.stderr[-3000:]
    test = write_jsonl(tmp_path / "test.jsonl", home_rows())
    run_dir = tmp_path / "runs" / "run"
    result = run_script(
        "evaluate.py", str(run_dir), "--all_checkpoints", "--test_dataset", str(test), "--max_new_tokens", "4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:5]] == [
        ["checkpoint-2", "2"],
        ["checkpoint-4", "4"],
        ["checkpoint-6", "6"],
        ["loras/run", "final"],
    ]
    table = json.loads((run_dir / "eval_table.json").read_text())
    assert {row["path"]: row["step"] for row in table["rows"]}[str((tmp_path / "loras" / "run").resolve())] is None
    assert all(json.loads((Path(row["path"]) / RESULTS_FILE).read_text()) for row in table["rows"])


# --- metrics ---------------------------------------------------------------------------------------------


def test_text_metrics_are_the_libraries_values():
    from nltk.translate.meteor_score import single_meteor_score
    from rapidfuzz.distance import Levenshtein
    from rouge_score import rouge_scorer

    reply, reference = "the kitchen light is now on", "turning on the kitchen lights"
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = {name: score.fmeasure for name, score in scorer.score(reference, reply).items()}
    assert metrics.rouge([reply], [reference]) == pytest.approx(expected)

    class NoWordNet:  # nltk's METEOR with its stemmer and without WordNet synonyms, as chattune runs it
        def synsets(self, word):
            return []

    by_nltk = single_meteor_score(reference.split(), reply.split(), wordnet=NoWordNet())
    assert metrics.meteor([reply], [reference]) == pytest.approx(by_nltk)
    assert by_nltk > 0.5  # "light" and "lights" match by their stem
    assert metrics.edit_distance(["kitten"], ["sitting"]) == pytest.approx(
        Levenshtein.normalized_distance("kitten", "sitting")
    )
    assert metrics.edit_distance(["kitten"], ["sitting"]) == pytest.approx(3 / 7)


def test_identical_and_empty_texts():
    same = ["Die Küche ist hell"]
    assert metrics.edit_distance(same, same) == 0.0 and metrics.edit_distance([""], [""]) == 0.0
    assert metrics.rouge(same, same) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert metrics.rouge([""], [""]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert metrics.meteor([""], [""]) == 1.0
    assert 0.9 < metrics.meteor(same, same) <= 1.0  # METEOR's fragmentation penalty keeps a short match below 1
    assert metrics.meteor(["völlig anders"], same) == 0.0
    assert metrics.edit_distance(["abc"], ["xyz"]) == 1.0


def test_metrics_are_none_without_examples():
    assert metrics.meteor([], []) is None and metrics.edit_distance([], []) is None
    assert metrics.rouge([], []) == {"rouge1": None, "rouge2": None, "rougeL": None}
    assert metrics.latency([None]) == {"latency_mean_s": None, "latency_p95_s": None}


def test_latency_mean_and_p95_per_slice():
    import numpy

    scores = [score_example("Hi.", "Hi.") for _ in range(5)]
    for score, seconds in zip(scores, [0.1, 0.2, 0.3, 0.4, 2.0]):
        score.seconds = seconds
    summary = summarize(scores, ["en"] * 5, ["a", "a", "a", "b", "b"])
    assert summary["latency_mean_s"] == pytest.approx(0.6)
    assert summary["latency_p95_s"] == pytest.approx(numpy.percentile([0.1, 0.2, 0.3, 0.4, 2.0], 95))
    assert summary["by_kind"]["b"]["latency_mean_s"] == pytest.approx(1.2)


def test_device_count_slices():
    assert [device_bucket(n) for n in (0, 1, 4, 5, 8, 9, 16, 17, 300)] == [
        "0", "1-4", "1-4", "5-8", "5-8", "9-16", "9-16", "17+", "17+"
    ]  # fmt: skip
    system = "\n".join(["You are Al. Services: light.turn_on()", "Devices:", *device_lines(7), "fan.x 'Fan' = on"])
    assert devices_in_prompt([{"role": "system", "content": system}, {"role": "user", "content": "on"}]) == 8
    assert devices_in_prompt([{"role": "user", "content": "Devices:\n" + "\n".join(device_lines(3))}]) == 3
    scores = [score_example("Hi.", reply) for reply in ("Hi.", "Ho.", "Hi.")]
    summary = summarize(scores, ["en"] * 3, ["k"] * 3, [2, 20, 3])
    assert list(summary["by_devices"]) == ["1-4", "17+"]
    assert summary["by_devices"]["1-4"]["n_examples"] == 2
    assert summary["by_devices"]["17+"]["edit_distance"] == pytest.approx(1 / 3)  # "Ho." against "Hi."
    assert "by_devices" not in summarize(scores, ["en"] * 3, ["k"] * 3)  # the existing call is unchanged


def test_text_metrics_compare_sentences_not_the_call_block():
    score = score_example(format_reply("Turning on.", [KITCHEN_ON]), format_reply("Turning on.", [{"service": "x"}]))
    overall = aggregate([score])
    assert overall["edit_distance"] == 0.0 and overall["rouge2"] == 1.0
    assert overall["service_call_exact_match"] == 0.0
