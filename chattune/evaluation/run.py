"""The recipe behind evaluate.py: load a model or adapter, generate replies for a test set, score them.

Reading the inputs lives in chattune.evaluation.inputs, the torch work in chattune.evaluation.generation,
the scoring in chattune.domains.homeassistant.scoring and the result files in chattune.evaluation.report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chattune.cli import entry_point
from chattune.data.masking import ChatMasker
from chattune.domains.homeassistant.scoring import score_example, summarize
from chattune.evaluation.generation import (
    auto_max_new_tokens,
    generate_replies,
    reference_continuations,
    reference_nll,
    render_prompts,
    stop_token_ids,
)
from chattune.evaluation.inputs import (
    inspect_model_folder,
    load_examples,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
)
from chattune.evaluation.report import check_writable, failure_records, format_table, write_outputs

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


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Score a fine-tuned model (full, merged or LoRA adapter) on a Home Assistant test set.",
    )
    parser.add_argument("model", help="Model folder (config.json + weights) or LoRA adapter folder.")
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
    parser.add_argument("--output_dir", default=None, help="Where result files go (default: the MODEL folder).")
    parser.add_argument("--json", action="store_true", help="Print the summary JSON as the last stdout line.")
    args = parser.parse_args(argv)
    return Settings(**vars(args))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(settings: Settings) -> dict:
    """Evaluate and write the result files; returns the summary."""
    source = inspect_model_folder(settings.model)
    folder = Path(settings.output_dir) if settings.output_dir else source.path
    check_writable(folder, "pass another --output_dir" if settings.output_dir else "pass --output_dir DIR")
    examples = load_examples(settings.test_dataset, settings.max_examples)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    tokenizer = load_tokenizer(source)
    logger.info("loading %s %s on %s (%s)", source.kind, source.path, device, str(dtype).replace("torch.", ""))
    model = load_model(source, tokenizer, device, dtype)

    started = time.monotonic()
    prompts = render_prompts(tokenizer, examples)
    continuations = reference_continuations(ChatMasker(tokenizer), examples, prompts)
    max_new_tokens = settings.max_new_tokens or auto_max_new_tokens(tokenizer, examples)
    replies, nlls = generate_replies(
        model, tokenizer, prompts, settings.batch_size, max_new_tokens, device, continuations
    )
    apart = [i for i, continuation in enumerate(continuations) if continuation is None]
    if apart:  # references the prompt is not a prefix of: one teacher-forced pass of their own
        separate = reference_nll(model, tokenizer, [examples[i] for i in apart], settings.batch_size, device)
        for index, result in zip(apart, separate):
            nlls[index] = result
    scores = [score_example(e.reference, reply) for e, reply in zip(examples, replies)]
    for score, nll in zip(scores, nlls):
        if nll is not None:
            score.nll_sum, score.n_tokens = nll
    summary = summarize(scores, [e.language for e in examples], [e.kind for e in examples])

    record = {
        "model": str(source.path),
        "model_kind": source.kind,
        "base_model": source.base,
        "test_dataset": settings.test_dataset,
        "n_examples": len(examples),
        "batch_size": settings.batch_size,
        "max_examples": settings.max_examples,
        "max_new_tokens": max_new_tokens,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "decoding": "greedy",
        "stop_token_ids": stop_token_ids(model, tokenizer),
        "seconds": round(time.monotonic() - started, 2),
    }
    paths = write_outputs(folder, summary, record, failure_records(examples, replies, scores))
    logger.info("wrote %s and %s", *paths)
    return summary


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stdout = sys.stdout
    # With --json the summary must be the last stdout line: anything a library prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if settings.json else stdout):
        summary = run(settings)
    if settings.json:
        print(json.dumps(summary, ensure_ascii=False), file=stdout, flush=True)
    else:
        print(format_table(summary), file=stdout)
    return 0
