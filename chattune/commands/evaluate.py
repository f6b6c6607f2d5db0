"""The recipe behind evaluate.py: load a model or adapter, generate replies for a test set, score them; or do that
for every checkpoint of a run, or for several models, into one comparison table.

Reading the test set lives in chattune.evaluation.inputs, loading the model in chattune.models and
chattune.evaluation.runtime, the torch work in chattune.evaluation.generation, the scoring in the task
(chattune.domains), the result files in chattune.evaluation.report, and finding and reusing the models of a sweep
in chattune.evaluation.sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.cli import entry_point
from chattune.domains.task import Task, check_task_name, resolve_task
from chattune.domains.tool_calling.scoring import parser_for
from chattune.evaluation.generation import stop_token_ids
from chattune.evaluation.inputs import EvalError, Example, check_template_takes_examples, load_examples
from chattune.evaluation.report import (
    check_writable,
    failure_records,
    format_comparison,
    format_table,
    write_outputs,
    write_table,
)
from chattune.evaluation.runtime import generation_tokenizer, open_model
from chattune.evaluation.scored import generate_and_score, summarize_examples
from chattune.evaluation.sweep import (
    Target,
    Targets,
    checkpoint_targets,
    named_targets,
    results_folder,
    reuse_key,
    skip,
    stored_summary,
)
from chattune.models.device import pick_device, pick_dtype
from chattune.models.folders import ModelSource, inspect_model_folder

logger = logging.getLogger("chattune.evaluate")

DEFAULT_TEST_DATASET = "data/home_assistant_test.jsonl"


@dataclass
class Settings:
    model: str
    test_dataset: str = DEFAULT_TEST_DATASET
    batch_size: int = 8
    max_examples: int | None = None
    max_new_tokens: int | None = None  # None: sized from the references
    device: str = "auto"
    dtype: str = "auto"
    output_dir: str | None = None
    json: bool = False
    other_models: list[str] = field(default_factory=list)  # MODELs after the first: a comparison
    all_checkpoints: bool = False
    overwrite: bool = False
    tool_call_format: str = "auto"  # how tool calls are read from replies (chattune.evaluation.tool_calls)
    prompt_template_file: str | None = None  # a Jinja chat template used instead of the model's own
    gguf_runtime: str = "auto"  # what runs a .gguf MODEL: llama.cpp, transformers, or auto (llama.cpp if installed)
    compare: bool = False  # only says that several MODELs are compared; naming several does that anyway
    task: str = "auto"  # a registered task, module:Class or file.py:Class; auto: detected from the test data
    constrain: bool = False  # decode each reply under its prompt's grammar (the task's)
    resolved_task: Task | None = field(default=None, repr=False)  # the task object, once the examples are read

    def task_for(self, examples: Sequence[Example]) -> Task:
        if self.resolved_task is None:
            task = resolve_task(self.task, examples, tool_call_format=self.tool_call_format)
            if self.tool_call_format != "auto" and not task.reads_tool_call_format:
                raise EvalError(
                    f"--tool_call_format {self.tool_call_format}: {self.test_dataset} is scored by the {task.name} "
                    "task, which does not read tool calls; drop the flag, or give tool-calling test data"
                )
            self.resolved_task = task
        return self.resolved_task

    @property
    def several(self) -> bool:
        """A sweep or a comparison: one table row per model, results reused unless --overwrite."""
        return self.all_checkpoints or bool(self.other_models)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Score a fine-tuned model (full, merged or LoRA adapter) on a Home Assistant test set.",
    )
    parser.add_argument(
        "model",
        nargs="+",
        help="Model folder (config.json + weights), LoRA adapter folder, or a hub id (org/name) already in the local "
        "Hugging Face cache, read offline; several: one comparison table. With --all_checkpoints: a run folder, "
        "runs/<run>.",
    )
    parser.add_argument("--test_dataset", default=DEFAULT_TEST_DATASET, help="Chat rows: .jsonl/.json or folder.")
    parser.add_argument("--batch_size", type=_positive, default=8, help="Prompts generated together.")
    parser.add_argument("--max_examples", type=_positive, default=None, help="Evaluate only the first N rows.")
    parser.add_argument(
        "--max_new_tokens",
        type=_positive,
        default=None,
        help="Longest reply generated (default: 1.25 x the longest reference reply + 8 tokens).",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present.")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="auto: bfloat16 (float16 on older GPUs) on CUDA; on CPU bfloat16 with AMX or AVX512-BF16, else float32.",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Where result files go (default: the MODEL folder; for a hub id, ORG--NAME-eval in the working "
        "directory). Several models: <output_dir>/<label>/ for each, and the table's eval_table.json/.csv "
        "(default: the run folder with --all_checkpoints, else not written).",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print the summary JSON (several models: the table) as the last stdout line.",
    )
    parser.add_argument(
        "--all_checkpoints",
        action="store_true",
        help="MODEL is a run folder (runs/<run>): score every checkpoint-N in it and the run's final folder "
        "(models/<run> or loras/<run>), one table row each. Incomplete checkpoints are skipped with a warning.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="With several models: score again even where an eval_results.json of the same test set, reply budget, "
        "weights, task, --constrain, --tool_call_format and template exists (default: reuse it).",
    )
    parser.add_argument(
        "--tool_call_format",
        default="auto",
        help="Tool-calling test data: how calls are read from the model's replies: hermes "
        "(<tool_call>{...}</tool_call>, Qwen2), mistral ([TOOL_CALLS] [...]), json (a bare JSON call, Llama 3.1), "
        "auto (the first whose marker appears; default), or regex:PATTERN whose first group is one call's JSON. "
        "Refused for test data whose task reads no tool calls (the Home Assistant block format).",
    )
    parser.add_argument(
        "--prompt_template_file",
        default=None,
        help="A Jinja chat template to render prompts with instead of the model's own (as train.py's flag of that "
        "name), e.g. recipes/templates/chatml_tools.jinja to score an untuned ChatML model on tool-calling data.",
    )
    parser.add_argument(
        "--gguf_runtime",
        choices=("auto", "llama.cpp", "transformers"),
        default="auto",
        help="What runs a .gguf MODEL: llama.cpp (through llama-cpp-python: the file as it is deployed, with its "
        "quantization), transformers (dequantized to float: the weights, not the runtime), or auto: llama.cpp when "
        "llama-cpp-python is installed, else transformers with a warning (default).",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="Score every MODEL named and print one table, a row each, e.g. `--compare models/run "
        "models/run/run-q8_0.gguf models/run/run-q4_k_m.gguf` (naming several MODELs does the same).",
    )
    parser.add_argument(
        "--task",
        default="auto",
        help="How replies are read and scored: homeassistant (the ```homeassistant block of service calls), "
        "tool_calls (OpenAI-style tool calls, any tool schema), module:Class or path/file.py:Class for a task "
        "of your own (a chattune.domains.task.Task subclass), or auto: detected from the test data (default).",
    )
    parser.add_argument(
        "--constrain",
        action="store_true",
        help="Constrained decoding: each reply follows a grammar the task builds from its own prompt, so it can "
        "only name what the prompt lists (Home Assistant: listed entity ids, their domain's listed services, "
        "typed and ranged arguments; tool calls: the row's tools and their argument schemas). A .gguf in "
        "llama.cpp uses llama.cpp's GBNF sampler; transformers uses llguidance with the same grammar. Rows the task "
        "has no grammar for (no Devices line) are generated free and counted as unconstrained_rows.",
    )
    args = vars(parser.parse_args(argv))
    args["gguf_runtime"] = _gguf_runtime(args["gguf_runtime"])
    parser_for(args["tool_call_format"])  # a bad value fails here, before any model loads
    check_task_name(args["task"])
    if args["constrain"] and not _constraint_ready(args):
        from chattune.evaluation.constrained import require_llguidance

        require_llguidance()
    template = args["prompt_template_file"]
    if template is not None and not Path(template).is_file():
        raise EvalError(f"--prompt_template_file {template}: no such file")
    first, *others = args.pop("model")
    settings = Settings(model=first, other_models=others, **args)
    if settings.all_checkpoints and others:
        raise EvalError(f"--all_checkpoints takes one run folder (runs/<run>), got {len(others) + 1} paths")
    return settings


def _constraint_ready(args: dict) -> bool:
    """Whether --constrain can run without llguidance: every MODEL a .gguf scored in llama.cpp."""
    models = args["model"]
    return args["gguf_runtime"] == "llama.cpp" and all(str(m).endswith(".gguf") for m in models)


def gguf_file_type(path: Path) -> str:
    """The storage type a GGUF file declares (`general.file_type`: F16, Q8_0, Q4_K_M, ...)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file_type {value}"


def _gguf_runtime(requested: str) -> str:
    from chattune.evaluation.llama_cpp import INSTALL_HINT, llama_cpp_available

    if requested != "auto":
        return requested
    if llama_cpp_available():
        return "llama.cpp"
    logger.warning(
        "llama-cpp-python is not installed: a .gguf MODEL is dequantized and scored with transformers, which "
        "measures its weights, not the file in llama.cpp; %s",
        INSTALL_HINT,
    )
    return "transformers"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(settings: Settings) -> dict:
    """Evaluate one model and write the result files; returns the summary."""
    source = inspect_model_folder(settings.model, settings.gguf_runtime)
    folder = Path(settings.output_dir) if settings.output_dir else source.results_dir
    check_writable(folder, "pass another --output_dir" if settings.output_dir else "pass --output_dir DIR")
    examples = load_examples(settings.test_dataset, settings.max_examples)
    settings.task_for(examples)  # a flag the task does not read is refused before the model loads
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    return score_model(source, examples, settings, device, dtype, folder)


def score_model(
    source: ModelSource, examples: list[Example], settings: Settings, device: str, dtype: Any, folder: Path
) -> dict:
    """Load one model, generate and score its replies, write its result files into `folder`; returns the summary."""
    tokenizer = generation_tokenizer(source, settings.prompt_template_file)
    check_template_takes_examples(tokenizer, examples, settings.test_dataset)
    runtime = "llama.cpp" if source.kind == "gguf" else "transformers"
    precision = gguf_file_type(source.path) if source.kind == "gguf" else str(dtype).replace("torch.", "")
    logger.info("loading %s %s in %s on %s (%s)", source.kind, source.path, runtime, device, precision)
    model = open_model(source, tokenizer, device, dtype)

    task = settings.task_for(examples)
    started = time.monotonic()
    scored = generate_and_score(
        model, tokenizer, examples, task, settings.batch_size, device, settings.max_new_tokens,
        constrain=settings.constrain,
    )  # fmt: skip
    summary = summarize_examples(task, examples, scored.scores)
    if settings.constrain:
        summary["constrained"] = True
        summary["unconstrained_rows"] = len(scored.unconstrained_rows)
        if scored.unconstrained_rows:
            logger.warning(
                "--constrain: %d row(s) had no grammar and were generated free (no Devices line or tools): rows %s",
                len(scored.unconstrained_rows),
                ", ".join(map(str, scored.unconstrained_rows[:20]))
                + (" ..." if len(scored.unconstrained_rows) > 20 else ""),
            )

    record = {
        "model": source.hub_id or str(source.path),
        "model_kind": source.kind,
        "base_model": source.base,
        "test_dataset": settings.test_dataset,
        "n_examples": len(examples),
        "batch_size": settings.batch_size,
        "max_examples": settings.max_examples,
        "max_new_tokens": scored.max_new_tokens,
        "device": device,
        "runtime": runtime,
        "dtype": precision,
        "decoding": "greedy, constrained by the task's grammar" if settings.constrain else "greedy",
        "task": task.name,
        "unconstrained_rows": scored.unconstrained_rows,
        "stop_token_ids": model.stop_ids if runtime == "llama.cpp" else stop_token_ids(model, tokenizer),
        "seconds": round(time.monotonic() - started, 2),
        "reuse_key": reuse_key(source, examples, settings.max_new_tokens, _scoring_key(settings, task)),
    }
    if runtime == "llama.cpp":
        record["tokenization_mismatches"] = model.tokenization_mismatches
        model.close()
    paths = write_outputs(folder, summary, record, failure_records(task, examples, scored.replies, scored.scores))
    logger.info("wrote %s and %s", *paths)
    return summary


def _scoring_key(settings: Settings, task: Task) -> dict[str, Any]:
    """How replies are made and read, for the reuse of stored results: the task, the grammar's use, how tool calls
    are read, and the chat template that renders the prompts (its text: an edited file scores again)."""
    template = settings.prompt_template_file
    return {
        "task": task.name,
        "constrain": settings.constrain,
        "tool_call_format": settings.tool_call_format,
        "prompt_template_sha256": hashlib.sha256(Path(template).read_bytes()).hexdigest() if template else None,
    }


def run_several(settings: Settings) -> dict:
    """Evaluate every checkpoint of a run (--all_checkpoints) or every MODEL named; returns the table:
    {"rows": one per model, "skipped": incomplete checkpoints left out, with why}.

    Every model is found and checked before the first one loads. Each one's results are stored as a single
    evaluation stores them, and reused by the next evaluation of the same test set unless --overwrite.
    """
    if settings.all_checkpoints:
        targets = checkpoint_targets(settings.model)
    else:
        targets = named_targets([settings.model, *settings.other_models], settings.gguf_runtime)
    _require_some(settings, targets)
    examples = load_examples(settings.test_dataset, settings.max_examples)
    settings.task_for(examples)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    rows = []
    for target in list(targets.found):
        try:
            rows.append(_table_row(target, examples, settings, device, dtype))
        except (EvalError, OSError, ValueError) as error:
            if not settings.all_checkpoints:  # a model named on the command line: its problem is the user's
                raise
            # A checkpoint whose weights check out can still lack a file written after them (tokenizer, config).
            targets.found.remove(target)
            skip(targets.skipped, target.source.path, error)
    _require_some(settings, targets)
    _write_table(settings, targets, rows)
    return {"rows": rows, "skipped": targets.skipped}


def _require_some(settings: Settings, targets: Targets) -> None:
    if not targets.found:
        reasons = "; ".join(f"{s['model']}: {s['reason']}" for s in targets.skipped)
        raise EvalError(f"{settings.model}: no complete checkpoint or final model to evaluate ({reasons})")


def _table_row(target: Target, examples: list[Example], settings: Settings, device: str, dtype: Any) -> dict:
    folder = results_folder(target, settings.output_dir)
    key = reuse_key(
        target.source, examples, settings.max_new_tokens, _scoring_key(settings, settings.task_for(examples))
    )
    summary = None if settings.overwrite else stored_summary(folder, key)
    reused = summary is not None
    if reused:
        logger.info("%s: reusing %s (--overwrite scores again)", target.label, folder)
    else:
        summary = score_model(target.source, examples, settings, device, dtype, folder)
        _release_memory(device)
    overall = {name: summary.get(name) for name in settings.task_for(examples).metric_keys()}
    return {
        "model": target.label,
        "step": target.step,
        "final": target.final,
        "path": str(target.source.path),
        "reused": reused,
        **({"task": summary["task"]} if "task" in summary else {}),
        **overall,
    }


def _release_memory(device: str) -> None:
    """The last model's weights go before the next one loads, or a sweep holds two models at its peak."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _write_table(settings: Settings, targets: Targets, rows: list[dict]) -> None:
    folder = settings.output_dir or (settings.model if settings.all_checkpoints else None)
    if folder is None:
        logger.info("comparison table not written; pass --output_dir to keep it as eval_table.json/.csv")
        return
    record = {"test_dataset": settings.test_dataset, "max_examples": settings.max_examples}
    paths = write_table(Path(folder), rows, targets.skipped, record, settings.resolved_task)
    logger.info("wrote %s and %s", *paths)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stdout = sys.stdout
    # With --json the summary must be the last stdout line: anything a library prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if settings.json else stdout):
        result: Any = run_several(settings) if settings.several else run(settings)
    if settings.json:
        print(json.dumps(result, ensure_ascii=False), file=stdout, flush=True)
    else:
        print(
            format_comparison(result["rows"], settings.resolved_task, result["skipped"])
            if settings.several
            else format_table(result, settings.resolved_task),
            file=stdout,
        )
    return 0
