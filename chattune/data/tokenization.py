"""Turning loaded rows into token ids with assistant-only labels: batched, multi-process, cached by `datasets`.

Rows come from chattune.data.formats; the labels come from chattune.data.masking (automatic) or from
explicit --prefix_ids/--suffix_ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from chattune.data.formats import FORMATS_HELP, DataError, detect_format, normalize_messages, parse_tools
from chattune.data.masking import IGNORE_INDEX, ChatMasker, MaskingError, explicit_labels

logger = logging.getLogger(__name__)

# Status codes written by the tokenizing map, counted in the data summary.
KEPT, TOO_LONG, NO_RESPONSE, TEMPLATE_MISMATCH = 0, 1, 2, 3
STATUS_NAMES = {
    KEPT: "kept",
    TOO_LONG: "skipped: no response tokens left after truncation to ctx_size",
    NO_RESPONSE: "skipped: no assistant response found",
    TEMPLATE_MISMATCH: "skipped: chat template rewrites assistant turns",
}


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
