"""Training and test data on disk: loading rows, and the one registry of row formats.

Rows are loaded by chattune.data.sources (files, datasets folders, hub ids; one format per source).

Every row format is one `Format` entry in `FORMATS`: the columns that detect it, and how one row becomes chattune's
canonical form. SFT (chattune.data.tokenization), evaluation (chattune.evaluation.inputs), preference training
(chattune.training.trainers.preference) and the data generator's --merge all read rows through it, so adding a format
is one entry (plus tests) and every reader knows it. The uses:

* CHAT: a `Conversation` (canonical messages, tools, and per message whether it is trained): ShareGPT
  `conversations`, OpenAI `messages`, Alpaca `instruction`/`input`/`output`.
* TEXT: the text of a `text` row (completion-style training on every token).
* PAIRS: {"prompt", "chosen", "rejected"} as TRL takes them, from the generator's pairs, TRL's explicit-prompt
  pairs or TRL's implicit-prompt pairs.
* UNPAIRED: {"prompt", "completion", "label"} (KTO).

An optional `tools` column (list or JSON string) of chat rows is handed to the chat template. An assistant turn
with `"weight": 0` (OpenAI's fine-tuning key) stays in the context but is not trained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chattune.config.methods import CHAT, PAIRS, TEXT, UNPAIRED
from chattune.data.errors import DataError
from chattune.data.sources import load_source, parse_source

if TYPE_CHECKING:
    from datasets import Dataset

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


def load_rows(source: str | os.PathLike, default_split: str = "train") -> Dataset:
    """The rows of one source (a file, a datasets folder or a hub id: chattune.data.sources), with errors that
    name it and the line."""
    return load_source(parse_source(str(source), "data"), default_split)


# ---------------------------------------------------------------------------------------------------------------
# What a row becomes


@dataclass
class Conversation:
    """A chat row in canonical form."""

    messages: list[dict]  # {"role", "content"[, "tool_calls"]}, roles mapped to user/assistant/system/tool
    tools: list | None = None
    trained: list[bool] | None = None  # per message: an assistant turn the loss is computed on

    def __post_init__(self) -> None:
        if self.trained is None:
            self.trained = [m["role"] == "assistant" for m in self.messages]

    @property
    def trained_replies(self) -> list[bool]:
        """Per assistant message, in order: whether it is trained (weight 0 ones are context only)."""
        return [flag for message, flag in zip(self.messages, self.trained) if message["role"] == "assistant"]


def normalize_messages(turns: Any, where: str = "") -> list[dict]:
    """ShareGPT or OpenAI turns -> [{"role", "content", ...}] with canonical role names."""
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise DataError(f"{where}expected a list of messages ({{role, content}} or {{from, value}})")
    messages = []
    for turn in turns:
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        canonical = ROLE_ALIASES.get(str(role).lower())
        if canonical is None:
            raise DataError(f"{where}unknown role {role!r}; known: {sorted(set(ROLE_ALIASES))}")
        message = {"role": canonical, "content": content if content is not None else ""}
        if turn.get("tool_calls"):
            message["tool_calls"] = [_tool_call(call, where) for call in turn["tool_calls"]]
        messages.append(message)
    return messages


def _tool_call(call: Any, where: str) -> dict:
    """A call with its arguments as a dict: OpenAI's format stores them as a JSON string, and chat templates
    (Qwen2's, Llama 3.1's, ...) write them with `tojson`, which would quote the string a second time."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(f'{where}a tool call needs {{"function": {{"name": ..., "arguments": ...}}}}, got {call!r}')
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            name = function["name"]
            raise DataError(
                f"{where}the arguments of tool call {name!r} are not valid JSON ({error.msg}): {arguments!r}"
            ) from None
    return {**call, "function": {**function, "arguments": arguments if arguments is not None else {}}}


def parse_tools(tools: Any) -> list | None:
    if tools is None or tools == "":
        return None
    return json.loads(tools) if isinstance(tools, str) else list(tools)


def _trained(turns: list[dict], messages: list[dict], where: str) -> list[bool]:
    """Per message: an assistant turn the loss is computed on. `"weight": 0` (0 or 1) or home-llm V2's
    `"train_on_turn": false` (a bool) on an assistant turn makes it context only."""
    flags = []
    for turn, message in zip(turns, messages):
        weight, train_on_turn = turn.get("weight"), turn.get("train_on_turn")
        if weight is not None and (weight not in (0, 1) or message["role"] != "assistant"):
            raise DataError(
                f"{where}`weight` is 0 or 1 on an assistant turn, not {weight!r} on a {message['role']} turn"
            )
        if train_on_turn is not None and (not isinstance(train_on_turn, bool) or message["role"] != "assistant"):
            raise DataError(
                f"{where}`train_on_turn` is true or false on an assistant turn, not {train_on_turn!r} on a "
                f"{message['role']} turn"
            )
        flags.append(message["role"] == "assistant" and weight != 0 and train_on_turn is not False)
    return flags


def _check_present(row: dict, column: str, where: str) -> None:
    """A row without the column that decided its file's format is a row of another format: say so, not a type."""
    if row.get(column) is None:
        present = sorted(key for key, value in row.items() if value is not None)
        raise DataError(
            f"{where}has no `{column}`, the column that decided this source's format (this row has {present}); "
            "a file holds one format: split it and give each part as its own source"
        )


def _check_tool_results(messages: list[dict], where: str) -> None:
    """A `tool` message answers a call: it must follow an assistant turn with tool_calls (or another result)."""
    previous: dict | None = None
    for number, message in enumerate(messages, 1):
        if message["role"] == "tool":
            answers_a_call = previous is not None and (
                previous["role"] == "tool" or (previous["role"] == "assistant" and previous.get("tool_calls"))
            )
            if not answers_a_call:
                raise DataError(f"{where}message {number} is a tool result with no assistant tool call before it")
        previous = message


def _chat_column(column: str) -> Callable[[dict, str], Conversation]:
    def convert(row: dict, where: str) -> Conversation:
        _check_present(row, column, where)
        turns = row[column]
        if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
            raise DataError(f"{where}column `{column}` must hold a list of turns; {formats_help((CHAT, TEXT))}")
        messages = normalize_messages(turns, where)
        _check_tool_results(messages, where)
        return Conversation(messages, parse_tools(row.get("tools")), _trained(turns, messages, where))

    convert.__name__ = f"convert_{column}"
    return convert


def _text(row: dict, where: str) -> str:
    _check_present(row, "text", where)
    if not isinstance(row["text"], str):
        raise DataError(f"{where}`text` must be a string, not {type(row['text']).__name__}")
    return row["text"]


ALPACA_KEYS = ("instruction", "input", "output")


def _alpaca(row: dict, where: str) -> Conversation:
    """Alpaca's instruction (a blank line, then the input when there is one) asked, and its output answered."""
    missing = [key for key in ("instruction", "output") if row.get(key) is None]
    if missing:
        raise DataError(f"{where}missing key(s) {', '.join(missing)} (expected {', '.join(ALPACA_KEYS)})")
    for key in ALPACA_KEYS:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(f"{where}{key!r} must be a string")
    user, extra, output = row["instruction"].strip(), (row.get("input") or "").strip(), row["output"].strip()
    if not user or not output:
        raise DataError(f"{where}instruction and output must not be empty")
    messages = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user}]
    return Conversation([*messages, {"role": "assistant", "content": output}])


def _replies(answer: Any, where: str) -> Any:
    """A preference answer: a plain string stays one; a list of messages is made canonical."""
    if isinstance(answer, list):
        return normalize_messages(answer, where)
    return [{"role": "assistant", "content": str(answer)}]


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    """Columns a row of this format must fill: a file that lacks them in some rows reads them as null, which would
    otherwise train on the text "None"."""
    missing = [key for key in keys if row.get(key) is None]
    if missing:
        raise DataError(f"{where}{' and '.join(missing)} missing or null; every row needs {', '.join(keys)}")


def _generator_pair(row: dict, where: str) -> dict:
    _require(row, ("question", "chosen", "rejected"), where)
    prompt = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    prompt.append({"role": "user", "content": row["question"]})
    return {"prompt": prompt, "chosen": _replies(row["chosen"], where), "rejected": _replies(row["rejected"], where)}


def _explicit_pair(row: dict, where: str) -> dict:
    _require(row, ("prompt", "chosen", "rejected"), where)
    prompt = row["prompt"]
    if isinstance(prompt, str):  # plain text pairs stay plain text for TRL
        return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}
    prompt = normalize_messages(prompt, where)
    return {"prompt": prompt, "chosen": _replies(row["chosen"], where), "rejected": _replies(row["rejected"], where)}


def _implicit_pair(row: dict, where: str) -> dict:
    """{chosen, rejected} whole conversations: the messages they share are the prompt (TRL's extract_prompt)."""
    _require(row, ("chosen", "rejected"), where)
    if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
        raise DataError(
            f"{where}chosen and rejected without a prompt must be conversations (lists of messages) whose shared "
            "first messages are the prompt; plain-text pairs need a `prompt` column"
        )
    chosen, rejected = normalize_messages(row["chosen"], where), normalize_messages(row["rejected"], where)
    if chosen == rejected:
        return {"prompt": chosen, "chosen": [], "rejected": []}  # identical: counted and dropped by the reader
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}chosen and rejected share no first message, so there is no prompt to answer")
    if shared in (len(chosen), len(rejected)):
        raise DataError(f"{where}one of chosen and rejected is the other's prompt; each needs a reply of its own")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _unpaired(row: dict, where: str) -> dict:
    _require(row, ("prompt", "completion", "label"), where)
    label = row["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}label must be true (a good completion) or false (a bad one), not {label!r}")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": str(completion), "label": label}
    return {"prompt": normalize_messages(prompt, where), "completion": _replies(completion, where), "label": label}


# ---------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Format:
    name: str
    use: str  # CHAT, TEXT, PAIRS or UNPAIRED: what `convert` returns, and so which readers take it
    columns: tuple[str, ...]  # the columns that detect the format (all of them present)
    row: str  # how a row looks, for messages and docs
    convert: Callable[[dict, str], Any]  # (row, "file: row N: ") -> Conversation, str or dict; DataError if bad

    def detects(self, columns: Iterable[str]) -> bool:
        return set(self.columns) <= set(columns)


# In detection order: the first format whose columns a dataset has is its format.
FORMATS: dict[str, Format] = {}


def register(entry: Format) -> Format:
    """Add a format to the registry (after the others in detection order)."""
    FORMATS[entry.name] = entry
    return entry


register(
    Format(
        name="sharegpt",
        use=CHAT,
        columns=("conversations",),
        row='{"conversations": [{"from": "human", "value": ...}, ...]} (or role/content turns)',
        convert=_chat_column("conversations"),
    )
)
register(
    Format(
        name="openai",
        use=CHAT,
        columns=("messages",),
        row='{"messages": [{"role": "user", "content": ...}, ...]}',
        convert=_chat_column("messages"),
    )
)
register(Format(name="text", use=TEXT, columns=("text",), row='{"text": ...}', convert=_text))
register(
    Format(
        name="alpaca",
        use=CHAT,
        columns=("instruction", "output"),
        row='{"instruction", "input" (optional), "output"}',
        convert=_alpaca,
    )
)
register(
    Format(
        name="generator_pairs",
        use=PAIRS,
        columns=("question", "chosen", "rejected"),
        row='{"system" (optional), "question", "chosen", "rejected"}',
        convert=_generator_pair,
    )
)
register(
    Format(
        name="trl_pairs",
        use=PAIRS,
        columns=("prompt", "chosen", "rejected"),
        row='{"prompt", "chosen", "rejected"}',
        convert=_explicit_pair,
    )
)
register(
    Format(
        name="implicit_prompt_pairs",
        use=PAIRS,
        columns=("chosen", "rejected"),
        row='{"chosen", "rejected"} conversations that start with the same prompt',
        convert=_implicit_pair,
    )
)
register(
    Format(
        name="unpaired",
        use=UNPAIRED,
        columns=("prompt", "completion", "label"),
        row='{"prompt", "completion", "label"}',
        convert=_unpaired,
    )
)


def formats_help(uses: Iterable[str]) -> str:
    wanted = set(uses)
    return "expected one of: " + "; ".join(f"{f.name} {f.row}" for f in FORMATS.values() if f.use in wanted)


def detect(columns: Iterable[str], source: str, uses: Iterable[str] = (CHAT, TEXT)) -> Format:
    """The format of a dataset with these columns, among those of `uses`; a DataError that names what is missing."""
    columns, uses = set(columns), tuple(uses)
    candidates = [f for f in FORMATS.values() if f.use in uses]
    for candidate in candidates:
        if candidate.detects(columns):
            return candidate
    closest = max(candidates, key=lambda f: len(columns & set(f.columns)))  # the first of the best, in order
    if not columns & set(closest.columns):
        raise DataError(f"{source}: unrecognised columns {sorted(columns)}; {formats_help(uses)}")
    missing = [column for column in closest.columns if column not in columns]
    raise DataError(
        f"{source}: lacks column(s) {missing} of the {closest.name} format {closest.row}; {formats_help(uses)}"
    )


def detect_format(dataset: Dataset, source: str, uses: Iterable[str] = (CHAT, TEXT)) -> Format:
    return detect(dataset.column_names, source, uses)
