"""Loading training data and turning it into token ids with assistant-only labels.

Accepted inputs: .jsonl / .json files or a folder written by `datasets.save_to_disk`.
Accepted rows (one format per dataset):

* ShareGPT: `conversations` = [{"from": "human", "value": ...}, ...] or [{"role": ..., "content": ...}]
* OpenAI: `messages` = [{"role": ..., "content": ...}, ...]
* plain text: `text` (completion-style training on every token)

An optional `tools` column (list or JSON string) is handed to the chat template.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from chattune.masking import IGNORE_INDEX, ChatMasker, MaskingError, explicit_labels

logger = logging.getLogger(__name__)

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
CHAT_COLUMNS = ("conversations", "messages")
FORMATS_HELP = (
    "expected one of: `conversations` (ShareGPT: from/value or role/content), `messages` (OpenAI: "
    "role/content), or `text`; optionally `tools`"
)

# Status codes written by the tokenizing map, counted in the data summary.
KEPT, TOO_LONG, NO_RESPONSE, TEMPLATE_MISMATCH = 0, 1, 2, 3
STATUS_NAMES = {
    KEPT: "kept",
    TOO_LONG: "skipped: no response tokens left after truncation to ctx_size",
    NO_RESPONSE: "skipped: no assistant response found",
    TEMPLATE_MISMATCH: "skipped: chat template rewrites assistant turns",
}


class DataError(ValueError):
    """Bad input data; the message names the file (and line when there is one)."""


def load_rows(path: str | os.PathLike) -> Dataset:
    """Load a dataset file or folder, with errors that name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if len(data) != 1:
                raise DataError(f"{path}: holds splits {sorted(data)}; point to one split's folder")
            data = next(iter(data.values()))
        return data
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or a datasets folder")
    _check_json_file(path)
    try:
        return load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parse errors in many types; name the file either way
        raise DataError(f"{path}: could not be read as {path.suffix} ({error})") from error


def _check_json_file(path: Path) -> None:
    """Find the first malformed line before `datasets` does, so the error can name it."""
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as file:
            head = file.read(1).strip()
        if head == "[":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: item {index} is {type(row).__name__}, expected an object")
            return
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")


def detect_format(dataset: Dataset, source: str) -> str:
    columns = set(dataset.column_names)
    for column in (*CHAT_COLUMNS, "text"):
        if column in columns:
            return column
    raise DataError(f"{source}: unrecognised columns {sorted(columns)}; {FORMATS_HELP}")


def normalize_messages(turns: list[dict], where: str = "") -> list[dict]:
    """ShareGPT or OpenAI turns -> [{"role", "content", ...}] with canonical role names."""
    messages = []
    for turn in turns:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        canonical = ROLE_ALIASES.get(str(role).lower())
        if canonical is None:
            raise DataError(f"{where}unknown role {role!r}; known: {sorted(set(ROLE_ALIASES))}")
        message = {"role": canonical, "content": content if content is not None else ""}
        if turn.get("tool_calls"):
            message["tool_calls"] = turn["tool_calls"]
        messages.append(message)
    return messages


def parse_tools(tools: Any) -> list | None:
    if tools is None or tools == "":
        return None
    return json.loads(tools) if isinstance(tools, str) else list(tools)


@dataclass
class Tokenize:
    """Picklable batched map function: rows -> input_ids, labels, status."""

    tokenizer: Any
    masker: ChatMasker | None
    column: str
    ctx_size: int
    prefix_ids: list[int] | None = None
    suffix_ids: list[int] | None = None
    train_on_prompts: bool = False

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
        tools_column = batch.get("tools") or [None] * len(batch[self.column])
        if self.column != "text" and not self.prefix_ids:  # automatic masking: one tokenizer call per batch
            conversations = [
                (normalize_messages(value), parse_tools(tools))
                for value, tools in zip(batch[self.column], tools_column)
            ]
            encoded = [
                ([], [], TEMPLATE_MISMATCH)
                if isinstance(item, MaskingError)
                else self.finish(item.input_ids, item.labels)
                for item in self.masker.encode_many(conversations)
            ]
        else:
            encoded = [self.encode_one(value, tools) for value, tools in zip(batch[self.column], tools_column)]
        for ids, labels, status in encoded:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
        return out

    def encode_one(self, value: Any, tools: Any) -> tuple[list[int], list[int], int]:
        """Plain text, or a conversation masked by --prefix_ids/--suffix_ids."""
        tokenizer = self.tokenizer
        if self.column == "text":
            ids = tokenizer(value, add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
            return self.finish(ids, list(ids))
        messages = normalize_messages(value)
        try:
            text = self.masker.render(messages, parse_tools(tools))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            labels = explicit_labels(ids, self.prefix_ids, self.suffix_ids)
        except MaskingError:
            return [], [], TEMPLATE_MISMATCH
        return self.finish(ids, labels)

    def finish(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int], int]:
        """Skip rows with nothing to learn; label the prompt too with --train_on_prompts; cut to ctx_size."""
        if all(label == IGNORE_INDEX for label in labels):
            return [], [], NO_RESPONSE
        if self.train_on_prompts:  # still after the check: a conversation without a reply is still skipped
            labels = list(ids)
        ids, labels = ids[: self.ctx_size], labels[: self.ctx_size]
        if all(label == IGNORE_INDEX for label in labels):
            return [], [], TOO_LONG
        return ids, labels, KEPT


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: Any,
    masker: ChatMasker | None,
    *,
    source: str,
    ctx_size: int,
    num_proc: int | None = None,
    prefix_ids: list[int] | None = None,
    suffix_ids: list[int] | None = None,
    train_on_prompts: bool = False,
) -> tuple[Dataset, Counter]:
    """Tokenize and mask every row (batched, multi-process, cached by `datasets`); drop unusable rows."""
    column = detect_format(dataset, source)
    if column != "text":
        _check_first_row(dataset, column, source)
        if masker is None:
            raise DataError(f"{source}: chat data needs a chat template, and the tokenizer has none")
    function = Tokenize(tokenizer, masker, column, ctx_size, prefix_ids, suffix_ids, train_on_prompts)
    num_proc = num_proc if num_proc and num_proc > 1 and len(dataset) >= 256 else None
    cached_before = _cache_listing(dataset)
    tokenized = dataset.map(
        function,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing {Path(source).name}",
    )
    if tokenized.cache_files and all(Path(f["filename"]).name in cached_before for f in tokenized.cache_files):
        logger.info("%s: reusing the cached tokenization (same data, tokenizer and settings)", source)
    counts = Counter({STATUS_NAMES[code]: n for code, n in Counter(tokenized["status"]).items()})
    kept = tokenized.filter(lambda status: [s == KEPT for s in status], input_columns="status", batched=True)
    return kept.remove_columns("status"), counts


def _cache_listing(dataset: Dataset) -> set[str]:
    """Names of the files in the dataset's cache folder, to tell afterwards whether `map` reused one."""
    if not dataset.cache_files:
        return set()
    return {p.name for p in Path(dataset.cache_files[0]["filename"]).parent.iterdir()}


def _check_first_row(dataset: Dataset, column: str, source: str) -> None:
    """Fail fast, with the file named, on rows that are not lists of turns."""
    first = dataset[0][column]
    if not isinstance(first, list) or not first or not isinstance(first[0], dict):
        raise DataError(f"{source}: column `{column}` must hold a list of turns; {FORMATS_HELP}")
    normalize_messages(first, where=f"{source}: row 1: ")


def summarize(counts: Counter, source: str) -> str:
    total = sum(counts.values())
    lines = [f"{source}: {total} examples"]
    for name in STATUS_NAMES.values():
        if counts.get(name):
            lines.append(f"  {counts[name]:>8}  {name}")
    return "\n".join(lines)
