"""Training and test data on disk: loading rows, recognising their format, canonical chat messages.

Accepted inputs: .jsonl / .json files or a folder written by `datasets.save_to_disk`.
Accepted rows (one format per dataset):

* ShareGPT: `conversations` = [{"from": "human", "value": ...}, ...] or [{"role": ..., "content": ...}]
* OpenAI: `messages` = [{"role": ..., "content": ...}, ...]
* plain text: `text` (completion-style training on every token)

An optional `tools` column (list or JSON string) is handed to the chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from chattune.errors import ChattuneError

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


class DataError(ChattuneError, ValueError):
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
