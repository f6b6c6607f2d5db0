"""The recipe behind evaluate.py: load a model or adapter, generate replies for a test set, score them.

Scoring lives in chattune.metrics; this module does the I/O, the batching and the torch work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune import data as data_lib
from chattune.gguf_models import GGUFError, resolve_model
from chattune.masking import IGNORE_INDEX, ChatMasker, MaskingError, labels_from_spans
from chattune.metrics import METRIC_KEYS, ExampleScore, score_example, summarize

logger = logging.getLogger("chattune.evaluate")

DEFAULT_TEST_DATASET = "data/home_assistant_test.jsonl"
RESULTS_FILE = "eval_results.json"
FAILURES_FILE = "eval_failures.jsonl"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
EXPECTED_FOLDER_HELP = (
    "expected a model folder (config.json + one of " + ", ".join(WEIGHT_FILES) + ") or a LoRA adapter folder "
    "(adapter_config.json + one of " + ", ".join(ADAPTER_WEIGHT_FILES) + ")"
)


class EvalError(ValueError):
    """A problem with the user's inputs; reported in one line, exit status 2."""


@dataclass
class Example:
    prompt: list[dict]  # every message before the last assistant message
    reference: str  # the last assistant message
    language: str
    kind: str
    tools: list | None = None


@dataclass
class ModelSource:
    path: Path
    kind: str  # "model" or "adapter"
    base: str | None = None  # the base model an adapter was trained on


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


# --- inputs ----------------------------------------------------------------------------------------------


def inspect_model_folder(path: str | os.PathLike) -> ModelSource:
    """Tell a full model folder from a LoRA adapter folder, with an error that lists what was expected.

    A GGUF file (or a folder holding one) is converted once to a model folder and evaluated as one.
    """
    folder = Path(resolve_model(str(path)))
    if not folder.exists():
        raise EvalError(f"{folder}: no such file or folder; {EXPECTED_FOLDER_HELP}")
    if not folder.is_dir():
        raise EvalError(f"{folder}: is a file, not a folder; {EXPECTED_FOLDER_HELP}")
    names = sorted(p.name for p in folder.iterdir())
    if (folder / "adapter_config.json").is_file():
        if not any(name in names for name in ADAPTER_WEIGHT_FILES):
            raise EvalError(f"{folder}: adapter_config.json but no adapter weights; {EXPECTED_FOLDER_HELP}")
        return ModelSource(folder, "adapter", _adapter_base(folder))
    if (folder / "config.json").is_file() and any(name in names for name in WEIGHT_FILES):
        return ModelSource(folder, "model")
    found = ", ".join(names) or "nothing"
    raise EvalError(f"{folder}: neither a model nor a LoRA adapter; {EXPECTED_FOLDER_HELP}; found: {found}")


def _adapter_base(folder: Path) -> str:
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvalError(f"{folder / 'adapter_config.json'}: unreadable ({error})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise EvalError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path; cannot load the base model")
    return str(base)


def load_examples(path: str, max_examples: int | None = None) -> list[Example]:
    """Chat rows -> prompts and references. Raises DataError naming the file (and row) on bad input."""
    rows = data_lib.load_rows(path)
    column = data_lib.detect_format(rows, path)
    if column == "text":
        raise data_lib.DataError(
            f"{path}: plain `text` rows have no reference answer to compare with; evaluation needs "
            "`conversations` (ShareGPT) or `messages` (OpenAI) rows ending in an assistant message"
        )
    if max_examples is not None:
        rows = rows.select(range(min(max_examples, len(rows))))
    examples = []
    for index, row in enumerate(rows):
        where = f"{path}: row {index + 1}: "
        turns = row[column]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise data_lib.DataError(f"{where}column `{column}` must hold a list of turns; {data_lib.FORMATS_HELP}")
        examples.append(_split_conversation(data_lib.normalize_messages(turns, where), row, where))
    if not examples:
        raise data_lib.DataError(f"{path}: no examples to evaluate")
    return examples


def _split_conversation(messages: list[dict], row: dict, where: str) -> Example:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise data_lib.DataError(f"{where}no assistant message to use as the reference")
    if last == 0:
        raise data_lib.DataError(f"{where}the assistant message has no prompt before it")
    return Example(
        prompt=messages[:last],
        reference=str(messages[last]["content"]),
        language=str(row.get("language") or "unknown"),
        kind=str(row.get("kind") or "unknown"),
        tools=data_lib.parse_tools(row.get("tools")),
    )


# --- model -----------------------------------------------------------------------------------------------


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA GPU is visible to torch")
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    import torch

    from chattune.modeling import cpu_has_native_bf16

    if requested == "auto":
        # bfloat16 halves GPU memory at no visible cost to greedy decoding; CPUs without bfloat16 instructions
        # are fastest in float32, those with AMX or AVX512-BF16 several times faster in bfloat16.
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as error:
        hint = "train.py saves one beside every model and adapter"
        raise EvalError(f"{source.path}: no usable tokenizer ({hint}): {error}") from None
    if not tokenizer.chat_template:
        raise EvalError(f"{source.path}: the tokenizer has no chat template, so prompts cannot be rendered")
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, tokenizer: Any, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    if source.kind == "model":
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    else:
        model = _load_adapter(source, tokenizer, dtype)
    return model.to(device).eval()


def _load_adapter(source: ModelSource, tokenizer: Any, dtype: Any) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from chattune.tokens import resize_embeddings

    try:
        base = AutoModelForCausalLM.from_pretrained(resolve_model(source.base), dtype=dtype)
    except OSError as error:
        raise EvalError(
            f"{source.path}: cannot load the base model {source.base!r} named in adapter_config.json: {error}"
        ) from None
    # train.py grows the embeddings when it adds tokens; the adapter's saved embeddings have that size.
    resize_embeddings(base, tokenizer)
    if (source.path / "generation_config.json").is_file():
        base.generation_config = GenerationConfig.from_pretrained(str(source.path))
    return PeftModel.from_pretrained(base, str(source.path))


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """generation_config's eos ids, plus the template's end-of-turn token.

    train.py already puts the end-of-turn token in generation_config, but an adapter's base model or a
    stock checkpoint may not have it, and a reply that runs past its turn would score as garbage.
    """
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, list | tuple) else [configured]
    ids.append(tokenizer.eos_token_id)
    with contextlib.suppress(Exception):  # an unusual template only loses the extra stop token
        end_of_turn = ChatMasker(tokenizer).end_of_turn_token()
        if end_of_turn is not None:
            ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


# --- generation and perplexity ---------------------------------------------------------------------------


def render_prompts(tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    from jinja2 import TemplateError

    prompts = []
    for index, example in enumerate(examples):
        try:
            text = tokenizer.apply_chat_template(
                example.prompt, tools=example.tools, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as error:  # e.g. a template that forbids system messages
            raise EvalError(f"row {index + 1}: the model's chat template rejects this prompt: {error}") from None
        # The template already wrote any BOS; letting the tokenizer add another would shift the model.
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    batch_size: int,
    max_new_tokens: int,
    device: str,
    continuations: Sequence[tuple[list[int], list[int]] | None] | None = None,
) -> tuple[list[str], list[tuple[float, int] | None]]:
    """Greedy replies in the order of `prompts`, and the reference NLL of each example with a continuation.

    A continuation is the reference turn's ids after the prompt, with its labels. Each batch runs one forward
    pass over prompt + reference: the reference logits give its NLL, and the key/value cache of the prompt
    part, cut back to the prompt, is where generation starts. Scoring the references then costs the few
    reference tokens instead of a second pass over every prompt.
    """
    import torch
    from tqdm import tqdm

    stops = stop_token_ids(model, tokenizer)
    config = greedy_config(model, tokenizer, stops, max_new_tokens)
    replies: list[str] = [""] * len(prompts)
    nlls: list[tuple[float, int] | None] = [None] * len(prompts)
    batches = list(length_sorted_batches([len(p) for p in prompts], batch_size))
    for batch in tqdm(batches, desc="generating", unit="batch", file=sys.stderr):
        ids, mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, device)
        extra: dict[str, Any] = {}
        with torch.inference_mode():
            wanted = [continuations[i] if continuations else None for i in batch]
            if any(c is not None for c in wanted):
                sums, cache = _prefill_with_references(model, ids, mask, wanted, tokenizer)
                extra[cache_argument(model)] = cache
                for index, result in zip(batch, sums):
                    nlls[index] = result
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
        for row, index in enumerate(batch):
            replies[index] = decode_reply(tokenizer, output[row, ids.shape[1] :].tolist(), stops)
    return replies, nlls


def _prefill_with_references(
    model: Any, ids: Any, mask: Any, continuations: Sequence[tuple[list[int], list[int]] | None], tokenizer: Any
) -> tuple[list[tuple[float, int] | None], Any]:
    """One pass over [left-padded prompt | reference | right padding]: reference NLLs and the prompt's cache."""
    import torch

    rows, width = ids.shape
    longest = max(len(c[0]) for c in continuations if c is not None)
    full_ids = torch.full((rows, width + longest), tokenizer.pad_token_id, dtype=ids.dtype, device=ids.device)
    full_mask = torch.zeros_like(full_ids)
    labels = torch.full_like(full_ids, IGNORE_INDEX)
    full_ids[:, :width], full_mask[:, :width] = ids, mask
    for row, continuation in enumerate(continuations):
        if continuation is not None:
            tokens, targets = continuation
            end = width + len(tokens)
            full_ids[row, width:end] = torch.tensor(tokens, device=ids.device)
            full_mask[row, width:end] = 1
            labels[row, width:end] = torch.tensor(targets, device=ids.device)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    # logits for the last prompt position (predicting the first reference token) and every reference position
    output = model(
        input_ids=full_ids, attention_mask=full_mask, position_ids=positions, use_cache=True, logits_to_keep=longest + 1
    )
    summed = summed_nll(output.logits[:, :-1], labels[:, width:])
    sums = [result if continuations[row] is not None else None for row, result in enumerate(summed)]
    cache = output.past_key_values
    # generate() feeds the last prompt token itself, so its cache must hold everything before it. A negative
    # crop removes that many positions in every transformers 5 release.
    cache.crop(-(cache.get_seq_length() - (width - 1)))
    return sums, cache


def cache_argument(model: Any) -> str:
    """The name forward() takes a key/value cache under: `cache` in recent transformers, else the older one."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def reference_continuations(
    masker: ChatMasker, examples: Sequence[Example], prompts: Sequence[list[int]]
) -> list[tuple[list[int], list[int]] | None]:
    """Per example, the reference turn's ids and labels that follow its rendered prompt exactly.

    None where the template renders the conversation so that the prompt is not its prefix (those
    references are scored by a separate teacher-forced pass) or where the reference cannot be masked.
    """
    continuations: list[tuple[list[int], list[int]] | None] = []
    for example, prompt in zip(examples, prompts):
        encoded = reference_token_ids(masker, example)
        usable = (
            encoded is not None
            and encoded[0][: len(prompt)] == prompt
            and all(label == IGNORE_INDEX for label in encoded[1][: len(prompt)])
            and any(label != IGNORE_INDEX for label in encoded[1][len(prompt) :])
        )
        continuations.append((encoded[0][len(prompt) :], encoded[1][len(prompt) :]) if usable else None)
    return continuations


def auto_max_new_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    """A reply budget from the references: a quarter more than the longest one, plus a few tokens.

    A model that does not stop (an untuned base model) then costs what a correct reply would, not 256 steps
    per batch; a reply that long is far off the reference anyway.
    """
    longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    return longest * 5 // 4 + 8


def greedy_config(model: Any, tokenizer: Any, stops: list[int], max_new_tokens: int) -> Any:
    config = copy.deepcopy(model.generation_config)
    # Sampling knobs from the checkpoint would only trigger warnings (or sampling) in greedy decoding.
    config.do_sample = False
    config.num_beams = 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.eos_token_id = stops
    config.pad_token_id = tokenizer.pad_token_id
    return config


def decode_reply(tokenizer: Any, new_ids: list[int], stops: Sequence[int]) -> str:
    """Text up to the first stop token (padding after it is not part of the reply)."""
    stop_set = set(stops)
    end = next((i for i, token in enumerate(new_ids) if token in stop_set), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


def reference_token_ids(masker: ChatMasker, example: Example) -> tuple[list[int], list[int]] | None:
    """prompt+reference ids, labelled on the reference turn only (earlier assistant turns are context)."""
    conversation = [*example.prompt, {"role": "assistant", "content": example.reference}]
    try:
        encoded = masker.encode(conversation, example.tools)
    except MaskingError:
        return None
    if not encoded.spans:
        return None
    last = encoded.spans[-1]
    labels = labels_from_spans(encoded.input_ids, encoded.offsets, [(last.label_start, last.label_end)])
    return encoded.input_ids, labels


def reference_nll(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, device: str
) -> list[tuple[float, int] | None]:
    """Teacher-forced summed NLL and token count of each reference answer (None if it cannot be masked)."""
    import torch
    from tqdm import tqdm

    masker = ChatMasker(tokenizer)
    encoded = [reference_token_ids(masker, example) for example in examples]
    usable = [i for i, e in enumerate(encoded) if e is not None and any(t != IGNORE_INDEX for t in e[1])]
    results: list[tuple[float, int] | None] = [None] * len(examples)
    batches = list(length_sorted_batches([len(encoded[i][0]) for i in usable], batch_size))
    for batch in tqdm(batches, desc="perplexity", unit="batch", file=sys.stderr):
        indices = [usable[i] for i in batch]
        with torch.inference_mode():
            sums = _batch_nll(model, [encoded[i] for i in indices], tokenizer.pad_token_id, device)
        for index, result in zip(indices, sums):
            results[index] = result
    skipped = len(examples) - len(usable)
    if skipped:
        logger.warning("perplexity: %d example(s) skipped, the chat template did not render them verbatim", skipped)
    return results


def _batch_nll(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str) -> list:

    ids, mask = left_pad([p[0] for p in pairs], pad_id, device)
    labels, _ = left_pad([p[1] for p in pairs], IGNORE_INDEX, device)
    # Left padding keeps every answer at the right edge, so only the last `keep` positions need logits:
    # a long system prompt then costs no vocabulary-sized logits.
    answer_length = max(len(p[1]) - next(i for i, t in enumerate(p[1]) if t != IGNORE_INDEX) for p in pairs)
    keep = min(answer_length + 1, ids.shape[1])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return summed_nll(logits[:, :-1], labels[:, -(keep - 1) :])


def summed_nll(logits: Any, targets: Any) -> list[tuple[float, int]]:
    """Per row, the summed NLL of the labelled `targets` under `logits` (fp32) and how many were labelled."""
    import torch

    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counted = targets != IGNORE_INDEX
    return [(float(nll[row][counted[row]].sum()), int(counted[row].sum())) for row in range(targets.shape[0])]


# --- outputs ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def failure_records(examples: Sequence[Example], replies: Sequence[str], scores: Sequence[ExampleScore]) -> list:
    return [
        {
            "row": index + 1,
            "prompt": example.prompt,
            "expected": example.reference,
            "got": reply,
            "expected_calls": score.expected_calls,
            "got_calls": score.predicted_calls,
            "json_valid": score.json_valid,
            "language": example.language,
            "kind": example.kind,
        }
        for index, (example, reply, score) in enumerate(zip(examples, replies, scores))
        if not score.exact_match
    ]


def write_outputs(folder: Path, summary: dict, settings: dict, failures: list) -> tuple[Path, Path]:
    results_path, failures_path = folder / RESULTS_FILE, folder / FAILURES_FILE
    write_atomic(results_path, json.dumps({"summary": summary, "settings": settings}, indent=2, ensure_ascii=False))
    write_atomic(failures_path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return results_path, failures_path


SHORT_NAMES = {
    "service_call_exact_match": "exact",
    "call_precision": "prec",
    "call_recall": "recall",
    "entity_accuracy": "entity",
    "json_valid_rate": "json_ok",
    "no_call_accuracy": "no_call",
    "perplexity": "ppl",
    "bleu": "bleu",
    "rougeL": "rougeL",
    "n_examples": "n",
}


def format_table(summary: dict) -> str:
    """One row per group (overall, each language, each kind); '-' where a metric does not apply."""
    rows = [("overall", summary)]
    rows += [(f"language={name}", metrics) for name, metrics in summary["by_language"].items()]
    rows += [(f"kind={name}", metrics) for name, metrics in summary["by_kind"].items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["".ljust(width) + "".join(f" {SHORT_NAMES[k]:>8}" for k in METRIC_KEYS)]
    for name, metrics in rows:
        lines.append(name.ljust(width) + "".join(f" {_cell(k, metrics[k]):>8}" for k in METRIC_KEYS))
    legend = ", ".join(f"{short}={key}" for key, short in SHORT_NAMES.items())
    notes = f"columns: {legend}; '-' = no applicable example; bleu on a 0-100 scale"
    return "\n".join([*lines, "", *textwrap.wrap(notes, width=120)])


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "n_examples":
        return str(value)
    if key in ("perplexity", "bleu"):
        return f"{value:.2f}" if value < 1e5 else f"{value:.2e}"
    return f"{value:.3f}"


# --- command line ----------------------------------------------------------------------------------------


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
    folder = Path(settings.output_dir) if settings.output_dir else source.path
    paths = write_outputs(folder, summary, record, failure_records(examples, replies, scores))
    logger.info("wrote %s and %s", *paths)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stdout = sys.stdout
    try:
        # With --json the summary must be the last stdout line: anything a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr if settings.json else stdout):
            summary = run(settings)
    except (EvalError, GGUFError, data_lib.DataError) as error:
        # Printed rather than logged: it must reach the user even when logging is configured elsewhere.
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings.json:
        print(json.dumps(summary, ensure_ascii=False), file=stdout, flush=True)
    else:
        print(format_table(summary), file=stdout)
    return 0
