"""What evaluate.py and train.py's --eval_generate read: the test examples, and the error of evaluation's inputs.

The model, adapter or GGUF file itself is read by chattune.models (folders, tokenizer, loading).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chattune.data import formats
from chattune.errors import ChattuneError


class EvalError(ChattuneError, ValueError):
    """A problem with the user's inputs; reported in one line, exit status 2."""


@dataclass
class Example:
    prompt: list[dict]  # every message before the last assistant message
    reference: str  # the last assistant message (tool calls: its content, then each call's JSON on a line)
    language: str
    kind: str
    tools: list | None = None
    reference_message: dict | None = None  # tool-calling data: the whole reference turn, calls included
    after_tool_result: bool = False  # tool-calling data: the turn answers a tool result
    row: int = 0  # its row in the test file, from 0 (not part of what is scored)


def load_examples(path: str, max_examples: int | None = None) -> list[Example]:
    """Chat rows -> prompts and references. Raises DataError naming the file (and row) on bad input."""
    rows = formats.load_rows(path, default_split="test")
    data_format = formats.detect_format(rows, path)
    if data_format.use == formats.TEXT:
        raise formats.DataError(
            f"{path}: plain `text` rows have no reference answer to compare with; evaluation needs chat rows "
            f"ending in an assistant message; {formats.formats_help([formats.CHAT])}"
        )
    if max_examples is not None:
        rows = rows.select(range(min(max_examples, len(rows))))
    conversations = [data_format.convert(row, f"{path}: row {index + 1}: ") for index, row in enumerate(rows)]
    tool_data = any(c.tools or any(m.get("tool_calls") for m in c.messages) for c in conversations)
    examples = []
    for index, (row, conversation) in enumerate(zip(rows, conversations)):
        where = f"{path}: row {index + 1}: "
        found = (
            _tool_turns(conversation, row, where)
            if tool_data
            else [_split_conversation(conversation.messages, conversation.tools, row, where)]
        )
        examples.extend(dataclasses.replace(example, row=index) for example in found)
    if not examples:
        raise formats.DataError(f"{path}: no examples to evaluate")
    return examples


def _split_conversation(messages: list[dict], tools: list | None, row: dict, where: str) -> Example:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise formats.DataError(f"{where}no assistant message to use as the reference")
    if last == 0:
        raise formats.DataError(f"{where}the assistant message has no prompt before it")
    return Example(
        prompt=messages[:last],
        reference=str(messages[last]["content"]),
        language=str(row.get("language") or "unknown"),
        kind=str(row.get("kind") or "unknown"),
        tools=tools,
    )


def _tool_turns(conversation: formats.Conversation, row: dict, where: str) -> list[Example]:
    """Every trained assistant turn of a tool-calling conversation, each with the messages before it as its prompt:
    the calls after the request, the retry after a failed call, the reply after the tool results."""
    examples = []
    for index, (message, trained) in enumerate(zip(conversation.messages, conversation.trained)):
        if not trained or index == 0:
            continue
        calls = [json.dumps(call["function"], ensure_ascii=False) for call in message.get("tool_calls") or []]
        examples.append(
            Example(
                prompt=conversation.messages[:index],
                reference="\n".join([str(message["content"] or ""), *calls]).strip(),
                language=str(row.get("language") or "unknown"),
                kind=str(row.get("kind") or "unknown"),
                tools=conversation.tools,
                reference_message=message,
                after_tool_result=conversation.messages[index - 1]["role"] == "tool",
            )
        )
    if not examples:
        raise formats.DataError(f"{where}no trained assistant turn to use as the reference")
    return examples


def check_template_takes_examples(tokenizer: Any, examples: Sequence[Example], test_dataset: str) -> None:
    """train.py's refusals for the same pairing, before the model loads: a template that raises on a test row
    (Gemma's on a system turn), or drops the tool calls or the tool list of tool-calling rows, which would score the
    model on prompts that lost them."""
    from chattune.data.masking import ChatMasker
    from chattune.data.tokenization import check_template_takes_rows, first_of_each_kind

    conversations = (
        (example.row, formats.Conversation([*example.prompt, example.reference_message], example.tools))
        if example.reference_message
        else (example.row, formats.Conversation(example.prompt, example.tools))
        for example in examples
    )
    check_template_takes_rows(first_of_each_kind(conversations), ChatMasker(tokenizer), test_dataset)
