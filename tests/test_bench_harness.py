"""bench/harness.py, which both benchmarks run their arms with: the probe's counts and timing window, the arm's
subprocess (its result, or its error with the log's last lines), the alternating repeats and the summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))  # bench/ is a folder of scripts beside the package
from bench import harness  # noqa: E402

ARM_SCRIPT = """
import json, os, sys
result = sys.argv[sys.argv.index("--result") + 1]
if "--fail" in sys.argv:
    print("loading the model"); print("RuntimeError: out of memory"); sys.exit(3)
json.dump({"tokens_per_s": 10.0, "cache": os.environ["HF_DATASETS_CACHE"], "lean": os.environ.get("LEAN")},
          open(result, "w"))
"""


@pytest.fixture
def arm_script(tmp_path) -> Path:
    script = tmp_path / "arm.py"
    script.write_text(ARM_SCRIPT)
    return script


def test_an_arm_runs_in_its_own_process_with_a_fresh_cache_removed_after(arm_script, tmp_path):
    result = harness.run_in_subprocess(arm_script, "a", ["--x"], tmp_path, "a-full-0", {"LEAN": "1"}, keep_log=False)
    assert result["tokens_per_s"] == 10.0 and result["lean"] == "1"
    cache = Path(result["cache"])
    assert cache.parent == tmp_path and cache.name.startswith("cache-a-full-0-") and not cache.exists()


@pytest.mark.parametrize("keep_log", [True, False])
def test_a_failed_arm_comes_back_as_its_error_and_last_log_lines(arm_script, tmp_path, keep_log, capsys):
    result = harness.run_in_subprocess(arm_script, "b", ["--fail"], tmp_path, "b-0", {}, keep_log=keep_log)
    assert result["arm"] == "b"
    assert result["error"] == "exit status 3: loading the model | RuntimeError: out of memory"
    assert ("log" in result) == keep_log and (tmp_path / "b-0.log").is_file()
    assert "arm b failed (exit status 3)" in capsys.readouterr().err


def test_repeats_alternate_the_arms_and_print_each_run_as_it_lands(capsys):
    order = []

    def run_one(arm: str, repeat: int) -> dict:
        order.append((arm, repeat))
        return {"tokens_per_s": float(len(order))}

    runs = harness.repeated(("x", "y"), 2, run_one, {"method": "lora"})
    assert order == [("x", 0), ("y", 0), ("x", 1), ("y", 1)]
    assert runs == {
        "x": [{"tokens_per_s": 1.0}, {"tokens_per_s": 3.0}],
        "y": [{"tokens_per_s": 2.0}, {"tokens_per_s": 4.0}],
    }
    landed = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert landed[1] == {"method": "lora", "arm": "y", "run": 1, "tokens_per_s": 2.0}


def test_summaries_keep_the_median_run_or_each_figures_median():
    runs = [{"tokens_per_s": 30.0, "rss": 5}, {"error": "exit status 1: x"}, {"tokens_per_s": 10.0, "rss": 9},
            {"tokens_per_s": 20.0, "rss": 1, "gpu": 2}]  # fmt: skip
    good, errors = harness.succeeded(runs)
    assert errors == ["exit status 1: x"] and len(good) == 3
    assert harness.median_run(good, "tokens_per_s") == {"tokens_per_s": 20.0, "rss": 1, "gpu": 2}
    assert harness.medians(good, ("tokens_per_s", "rss", "gpu")) == {"tokens_per_s": 20.0, "rss": 5}
    assert harness.spread(good, "rss") == [1, 9]


def test_the_probe_counts_tokens_and_times_steps_two_to_n():
    import torch

    probe = harness.Probe()

    def collator(examples):
        ids = torch.ones(2, len(examples), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = 1
        mask = torch.ones_like(ids)
        mask[1, 0] = 0  # one padding token in the second row
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    count = probe.counting(collator)
    for size in (3, 4, 5, 6):  # two steps of two micro-batches each
        count([{}] * size)
    assert probe.batches == [(5, 6, 2), (7, 8, 2), (9, 10, 2), (11, 12, 2)]
    probe.step_ends = [100.0, 102.0]
    timing = probe.timing(accumulation=2)  # step 2's micro-batches only
    assert timing == {"tokens_per_s": 10.0, "steps": 2, "timed_s": 2.0, "real_tokens_timed": 20,
                      "labelled_tokens_timed": 4}  # fmt: skip
    probe.step_ends = [100.0]
    assert probe.timing()["tokens_per_s"] is None  # one step: nothing left to time


def test_timed_adds_up_the_seconds_of_every_call(monkeypatch):
    probe = harness.Probe()
    clock = iter([0.0, 1.5, 10.0, 10.25])
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    doubled = probe.timed("prepare", lambda value: 2 * value)
    assert doubled(2) == 4 and doubled(3) == 6
    assert probe.seconds == {"prepare": 1.75}
