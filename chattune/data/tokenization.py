"""Turning loaded rows into token ids with assistant-only labels: batched, multi-process, cached by `datasets`.

Rows become conversations (or text) through the format registry of chattune.data.formats; the labels come
from chattune.data.masking (automatic) or from explicit --prefix_ids/--suffix_ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from jinja2 import TemplateError

from chattune.data.formats import CHAT, FORMATS, TEXT, Conversation, DataError, detect_format, formats_help
from chattune.data.masking import (
    IGNORE_INDEX,
    ChatMasker,
    Encoded,
    MaskingError,
    TemplateRejection,
    explicit_labels,
)
from chattune.data.missing_response import explain_missing_response
from chattune.data.sources import row_location

logger = logging.getLogger(__name__)

# Status codes written by the tokenizing map, counted in the data summary.
KEPT, TOO_LONG, NO_RESPONSE, TEMPLATE_MISMATCH, SPAN_MISMATCH = 0, 1, 2, 3, 4
STATUS_NAMES = {
    KEPT: "kept",
    TOO_LONG: "skipped: no response tokens left after truncation to ctx_size",
    NO_RESPONSE: "skipped: no assistant response found",
    TEMPLATE_MISMATCH: "skipped: chat template rewrites assistant turns",
    SPAN_MISMATCH: "skipped: --prefix_ids spans are not one per reply, so a weight 0 reply cannot be left out",
}


@dataclass
class Tokenize:
    """Picklable batched map function (with indices): rows -> input_ids, labels, status."""

    tokenizer: Any
    masker: ChatMasker | None
    format_name: str  # a key of chattune.data.formats.FORMATS
    ctx_size: int
    prefix_ids: list[int] | None = None
    suffix_ids: list[int] | None = None
    train_on_prompts: bool = False
    source: str = ""

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
        convert = FORMATS[self.format_name].convert
        rows = [
            convert(dict(zip(batch, values)), f"{self.source}: row {index + 1}: ")
            for values, index in zip(zip(*batch.values()), indices)
        ]
        if FORMATS[self.format_name].use == TEXT:
            encoded = [self.encode_text(text) for text in rows]
        elif not self.prefix_ids:  # automatic masking: one tokenizer call per batch
            items = self.masker.encode_many([(c.messages, c.tools) for c in rows], [c.trained_replies for c in rows])
            encoded = [self.finish_masked(item, row, index) for item, row, index in zip(items, rows, indices)]
        else:
            encoded = [self.encode_explicit(conversation, index) for conversation, index in zip(rows, indices)]
        text = FORMATS[self.format_name].use == TEXT
        out["empty_replies"] = [0 if text else empty_trained_replies(row) for row in rows]
        for ids, labels, status in encoded:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
        return out

    def encode_text(self, text: str) -> tuple[list[int], list[int], int]:
        """Plain text, closed by an EOS: every token is trained, or with --prefix_ids only the tokens from each
        prefix through the suffix that follows it (home-llm's raw-corpus mode: a conversation rendered as text)."""
        tokenizer = self.tokenizer
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        if self.prefix_ids:
            return self.finish(ids, explicit_labels(ids, self.prefix_ids, self.suffix_ids))
        return self.finish(ids, list(ids))

    def finish_masked(
        self, item: Encoded | MaskingError, conversation: Conversation, index: int
    ) -> tuple[list[int], list[int], int]:
        """An automatically masked row; one the template rejects stops the run, naming the row (in a worker of the
        pool too: the pool hands the error to the parent)."""
        if isinstance(item, TemplateRejection):
            raise template_rejected(conversation, item, f"{self.source}: row {index + 1}")
        if isinstance(item, MaskingError):
            return [], [], TEMPLATE_MISMATCH
        return self.finish(item.input_ids, item.labels)

    def encode_explicit(self, conversation: Conversation, index: int) -> tuple[list[int], list[int], int]:
        """A conversation masked by --prefix_ids/--suffix_ids."""
        try:
            text = self.masker.render(conversation.messages, conversation.tools)
        except TemplateError as error:
            raise template_rejected(conversation, error, f"{self.source}: row {index + 1}") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            labels = explicit_labels(ids, self.prefix_ids, self.suffix_ids, conversation.trained_replies)
        except MaskingError:
            return [], [], SPAN_MISMATCH
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
    data_format = detect_format(dataset, source)
    if data_format.use == CHAT:
        # fail fast, with the file named, on a first row that cannot work
        if len(dataset) and not data_format.convert(dataset[0], f"{source}: row 1: ").messages:
            raise DataError(f"{source}: row 1: an empty conversation; {formats_help((CHAT, TEXT))}")
        if masker is None:
            raise DataError(f"{source}: chat data needs a chat template, and the tokenizer has none")
        check_template_takes_rows(
            first_rows_of_each_kind(dataset, data_format, source), masker, source, tool_calls=not prefix_ids
        )
    elif prefix_ids:
        logger.info(
            "%s: text rows: training on the tokens from each --prefix_ids through the next --suffix_ids",
            source,
        )
    else:
        logger.info(
            "%s: text rows: training on every token (give --prefix_ids/--suffix_ids to train only the spans between "
            "them, as home-llm's raw-corpus mode did)",
            source,
        )
    function = Tokenize(
        tokenizer, masker, data_format.name, ctx_size, prefix_ids, suffix_ids, train_on_prompts, str(source)
    )
    num_proc = num_proc if num_proc and num_proc > 1 and len(dataset) >= 256 else None
    cached_before = _cache_listing(dataset)
    tokenized = dataset.map(
        function,
        batched=True,
        with_indices=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing {Path(source).name}",
    )
    if tokenized.cache_files and all(Path(f["filename"]).name in cached_before for f in tokenized.cache_files):
        logger.info("%s: reusing the cached tokenization (same data, tokenizer and settings)", source)
    statuses = tokenized["status"]
    counts = Counter({STATUS_NAMES[code]: n for code, n in Counter(statuses).items()})
    warn_missing_response(dataset, statuses, function)
    if "empty_replies" in tokenized.column_names:  # absent from a cache written before it was counted
        warn_empty_replies(tokenized["empty_replies"], statuses, source)
        tokenized = tokenized.remove_columns("empty_replies")
    kept = tokenized.filter(lambda status: [s == KEPT for s in status], input_columns="status", batched=True)
    return kept.remove_columns("status"), counts


def template_rejected(conversation: Conversation, error: Exception, where: str) -> DataError:
    """The one-line error for a row the chat template raises on (Gemma's on a system message)."""
    hint = ""
    if any(message["role"] == "system" for message in conversation.messages):
        hint = "; for a template without a system role, put the system text into the first user turn "
        hint += "(the data generator's --no_system_role does)"
    return DataError(f"{where}: the chat template rejects this conversation ({error}){hint}")


def first_rows_of_each_kind(dataset: Any, data_format: Any, source: str) -> dict[str, tuple[int, Conversation]]:
    """Every row read once, before any tokenizing: a row that cannot be read stops the run here, named, rather
    than in a worker of the pool. Returns the first row of each kind a template may not take, wherever it is:
    "first" (row 1), "system" (a system turn), "tool_calls" (an assistant turn with calls), "tools" (a tool list).
    Checking only the first 1,024 rows let a tool call further down train as an empty reply."""
    rows = (data_format.convert(row, f"{source}: row {index + 1}: ") for index, row in enumerate(_rows(dataset)))
    return first_of_each_kind(enumerate(rows))


def _rows(dataset: Any) -> Iterable[dict]:
    """The rows as dicts, read a thousand at a time: three times faster than iterating the dataset row by row
    (20,000 chat rows read and converted in 0.8 s, against 2.7 s, on 2 AVX2 cores)."""
    for batch in dataset.iter(batch_size=1000):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def first_of_each_kind(rows: Iterable[tuple[int, Conversation]]) -> dict[str, tuple[int, Conversation]]:
    """The first (row index, conversation) of each kind, from (row index, conversation) pairs in order."""
    found: dict[str, tuple[int, Conversation]] = {}
    for index, conversation in rows:
        for kind in row_kinds(conversation, index):
            found.setdefault(kind, (index, conversation))
    return found


def row_kinds(conversation: Conversation, index: int) -> list[str]:
    messages = conversation.messages
    kinds = [
        ("first", index == 0),
        ("system", any(message["role"] == "system" for message in messages)),
        ("tool_calls", any(message.get("tool_calls") for message in messages)),
        ("tools", bool(conversation.tools)),
    ]
    return [kind for kind, present in kinds if present]


def check_template_takes_rows(
    firsts: dict[str, tuple[int, Conversation]], masker: ChatMasker, source: str, *, tool_calls: bool = True
) -> None:
    """Refuse, before any work, rows the chat template cannot render (Gemma's raises on a system turn) or renders
    without what they carry: tool calls that it drops would train as empty replies, a tool list that it drops
    leaves the model without the tools. `tool_calls` False (explicit --prefix_ids) skips those two checks."""
    for index, conversation in sorted(firsts.values(), key=lambda item: item[0]):
        try:
            masker.render(conversation.messages, conversation.tools)
        except TemplateError as error:
            raise template_rejected(conversation, error, f"{source}: row {index + 1}") from None
    if not tool_calls:
        return
    for kind, problem in (("tool_calls", masker.tool_call_problem), ("tools", masker.tools_problem)):
        reason = problem() if kind in firsts else None
        if reason:
            what = "tool calls" if kind == "tool_calls" else "a tool list"
            raise DataError(
                f"{source}: row {firsts[kind][0] + 1} has {what}, but the chat template {reason}; give a template "
                "that renders tools, tool calls and `tool` messages with --prompt_template_file (docs/data.md)"
            )


def warn_missing_response(dataset: Dataset, statuses: list[int], function: Tokenize) -> None:
    """Name the first example skipped for having no assistant response, with the tokens where it should start
    (home-llm printed each one's ids); the others are counted in the summary."""
    skipped = [index for index, status in enumerate(statuses) if status == NO_RESPONSE]
    if not skipped:
        return
    first = skipped[0]
    where = row_location(function.source, first)
    row = FORMATS[function.format_name].convert(dataset[first], f"{where}: ")
    others = f" ({len(skipped) - 1} more like it are skipped too)" if len(skipped) > 1 else ""
    logger.warning(
        "%s: example has no assistant response, skipped%s: %s",
        where,
        others,
        explain_missing_response(row, function.tokenizer, function.masker, function.prefix_ids),
    )


def empty_trained_replies(conversation: Conversation) -> int:
    """Trained assistant replies with no text: they teach the model to answer with nothing at all."""
    replies = [message for message in conversation.messages if message["role"] == "assistant"]
    return sum(
        1
        for message, trained in zip(replies, conversation.trained_replies)
        if trained and not str(message["content"] or "").strip() and not message.get("tool_calls")
    )


def warn_empty_replies(empty: list[int], status: list[int], source: str) -> None:
    rows = [index for index, (count, code) in enumerate(zip(empty, status)) if count and code == KEPT]
    if not rows:
        return
    total = sum(empty[index] for index in rows)
    logger.warning(
        "%s: %d trained assistant %s empty (first in row %d); the model learns to answer with nothing: drop those "
        'turns, or give them "weight": 0 to keep them as context only',
        source,
        total,
        "reply is" if total == 1 else "replies are",
        rows[0] + 1,
    )


def _cache_listing(dataset: Dataset) -> set[str]:
    """Names of the files in the dataset's cache folder, to tell afterwards whether `map` reused one."""
    if not dataset.cache_files:
        return set()
    return {p.name for p in Path(dataset.cache_files[0]["filename"]).parent.iterdir()}


def summarize(counts: Counter, source: str) -> str:
    total = sum(counts.values())
    lines = [f"{source}: {total} examples"]
    for name in STATUS_NAMES.values():
        if counts.get(name):
            lines.append(f"  {counts[name]:>8}  {name}")
    return "\n".join(lines)
