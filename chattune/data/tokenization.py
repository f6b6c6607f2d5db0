"""Turning loaded rows into token ids with assistant-only labels: batched, multi-process, cached by `datasets`.

Rows become conversations (or text) through the format registry of chattune.data.formats; the labels come
from chattune.data.masking (automatic) or from explicit --prefix_ids/--suffix_ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from chattune.data.formats import CHAT, FORMATS, TEXT, Conversation, DataError, detect_format, formats_help
from chattune.data.masking import IGNORE_INDEX, ChatMasker, MaskingError, explicit_labels
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
            encoded = [
                ([], [], TEMPLATE_MISMATCH)
                if isinstance(item, MaskingError)
                else self.finish(item.input_ids, item.labels)
                for item in self.masker.encode_many(
                    [(c.messages, c.tools) for c in rows], [c.trained_replies for c in rows]
                )
            ]
        else:
            encoded = [self.encode_explicit(conversation) for conversation in rows]
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

    def encode_explicit(self, conversation: Conversation) -> tuple[list[int], list[int], int]:
        """A conversation masked by --prefix_ids/--suffix_ids."""
        text = self.masker.render(conversation.messages, conversation.tools)
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
        if len(dataset):
            _check_template_renders(data_format.convert(dataset[0], f"{source}: row 1: "), masker, source)
        if not prefix_ids:
            _check_tool_calls(dataset, data_format, masker, source)
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


def _check_template_renders(conversation: Conversation, masker: ChatMasker, source: str) -> None:
    """The chat template must take row 1 as it is: a template that raises (Gemma's on a system message) would
    otherwise stop tokenization with a Jinja traceback."""
    from jinja2 import TemplateError

    try:
        masker.render(conversation.messages, conversation.tools)
    except TemplateError as error:
        hint = ""
        if any(message["role"] == "system" for message in conversation.messages):
            hint = "; for a template without a system role, put the system text into the first user turn "
            hint += "(the data generator's --no_system_role does)"
        raise DataError(f"{source}: row 1: the chat template rejects this conversation ({error}){hint}") from None


# Rows read to find tool calls before tokenizing; a dataset mixes them in from its first rows in practice.
TOOL_CALL_SCAN_ROWS = 1024


def _check_tool_calls(dataset: Dataset, data_format: Any, masker: ChatMasker, source: str) -> None:
    """Refuse, before any work, tool-calling rows with a template that cannot render them."""
    for index in range(min(len(dataset), TOOL_CALL_SCAN_ROWS)):
        conversation = data_format.convert(dataset[index], f"{source}: row {index + 1}: ")
        if any(message.get("tool_calls") for message in conversation.messages):
            problem = masker.tool_call_problem()
            if problem:
                raise DataError(
                    f"{source}: row {index + 1} has tool calls, but the chat template {problem}; give a template "
                    "that renders tool calls and `tool` messages with --prompt_template_file (docs/data.md)"
                )
            return


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
