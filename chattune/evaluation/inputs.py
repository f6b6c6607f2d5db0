"""What evaluate.py evaluates: the model or LoRA adapter folder, the test examples, the device and dtype."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data import formats
from chattune.errors import ChattuneError
from chattune.models.gguf import find_gguf, read_architecture, resolve_model

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


class EvalError(ChattuneError, ValueError):
    """A problem with the user's inputs; reported in one line, exit status 2."""


class IncompleteWeightsError(EvalError):
    """A weights file that is missing or cut short, as a process killed while saving leaves it."""


@dataclass
class Example:
    prompt: list[dict]  # every message before the last assistant message
    reference: str  # the last assistant message (tool calls: its content, then each call's JSON on a line)
    language: str
    kind: str
    tools: list | None = None
    reference_message: dict | None = None  # tool-calling data: the whole reference turn, calls included
    after_tool_result: bool = False  # tool-calling data: the turn answers a tool result


@dataclass
class ModelSource:
    path: Path
    kind: str  # "model", "adapter", or "gguf" (a GGUF file run in llama.cpp)
    base: str | None = None  # the base model an adapter was trained on

    @property
    def results_dir(self) -> Path:
        """Where its result files go by default: the model's folder; for a GGUF file a folder beside it named
        after it (models/run/run-q8_0.gguf -> models/run/run-q8_0-eval), since one folder often holds several."""
        return self.path.parent / f"{self.path.stem}-eval" if self.kind == "gguf" else self.path

    @property
    def weight_files(self) -> list[Path]:
        """The files whose change invalidates stored results."""
        if self.kind == "gguf":
            return [self.path]
        names = WEIGHT_FILES + ADAPTER_WEIGHT_FILES
        return [p for p in sorted(self.path.iterdir()) if p.name in names or p.suffix == ".safetensors"]


def inspect_model_folder(path: str | os.PathLike, gguf_runtime: str = "transformers") -> ModelSource:
    """Tell a full model folder from a LoRA adapter folder, with an error that lists what was expected.

    A GGUF file (or a folder holding one) is run in llama.cpp with `gguf_runtime` "llama.cpp"; with
    "transformers" it is converted once to a model folder and evaluated as one.
    """
    if gguf_runtime == "llama.cpp":
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            read_architecture(gguf_file)  # a file that is not GGUF, or is cut short, is named before any work
            return ModelSource(gguf_file, "gguf")
    folder = Path(resolve_model(str(path)))
    if not folder.exists():
        raise EvalError(f"{folder}: no such file or folder; {EXPECTED_FOLDER_HELP}")
    if not folder.is_dir():
        raise EvalError(f"{folder}: is a file, not a folder; {EXPECTED_FOLDER_HELP}")
    names = sorted(p.name for p in folder.iterdir())
    if (folder / "adapter_config.json").is_file():
        if not any(name in names for name in ADAPTER_WEIGHT_FILES):
            raise IncompleteWeightsError(
                f"{folder}: adapter_config.json but no adapter weights; {EXPECTED_FOLDER_HELP}"
            )
        check_weights_complete(folder, ADAPTER_WEIGHT_FILES)
        return ModelSource(folder, "adapter", _adapter_base(folder))
    if (folder / "config.json").is_file():
        if not any(name in names for name in WEIGHT_FILES):
            raise IncompleteWeightsError(f"{folder}: config.json but no model weights; {EXPECTED_FOLDER_HELP}")
        check_weights_complete(folder, WEIGHT_FILES)
        return ModelSource(folder, "model")
    found = ", ".join(names) or "nothing"
    raise EvalError(f"{folder}: neither a model nor a LoRA adapter; {EXPECTED_FOLDER_HELP}; found: {found}")


def check_weights_complete(folder: Path, candidates: tuple[str, ...]) -> None:
    """Read the headers of the weight files (and every shard an index names) without loading any tensor.

    Raises IncompleteWeightsError for a missing shard or a file cut short. Without this, loading fails deep inside
    safetensors or torch.load with a message that names neither the file nor the cause.
    """
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        files = _index_shards(path) if name.endswith(".index.json") else [path]
        for file in files:
            problem = _weights_file_problem(file)
            if problem:
                hint = "a save killed part-way leaves this; re-save the model or pick another checkpoint"
                raise IncompleteWeightsError(f"{file}: {problem} ({hint})")
        return


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [index.parent / shard for shard in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise IncompleteWeightsError(f"{index}: unreadable shard index ({error})") from None


def _weights_file_problem(file: Path) -> str | None:
    """Why `file` cannot hold complete weights, or None. safetensors checks that its header covers the whole file."""
    if not file.is_file():
        return "missing"
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt"):
                return None
        except (SafetensorError, OSError) as error:
            return f"truncated or corrupt safetensors file ({error})"
    with file.open("rb") as handle:
        is_zip = handle.read(2) == b"PK"
    if is_zip:  # torch.save's format since torch 1.6; its directory is at the end, so a cut-short file lacks it
        try:
            with zipfile.ZipFile(file):
                return None
        except (zipfile.BadZipFile, OSError) as error:
            return f"truncated or corrupt torch checkpoint ({error})"
    return None  # the legacy pickle format: nothing cheap to check


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
        if tool_data:
            examples.extend(_tool_turns(conversation, row, where))
        else:
            examples.append(_split_conversation(conversation.messages, conversation.tools, row, where))
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


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA GPU is visible to torch")
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    import torch

    from chattune.models.loading import cpu_has_native_bf16

    if requested == "auto":
        # bfloat16 halves GPU memory at no visible cost to greedy decoding; CPUs without bfloat16 instructions
        # are fastest in float32, those with AMX or AVX512-BF16 several times faster in bfloat16.
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def load_tokenizer(source: ModelSource, template_file: str | None = None) -> Any:
    """The model's tokenizer, its chat template replaced by `template_file`'s when one is given."""
    from transformers import AutoTokenizer

    from chattune.models import gguf as gguf_models

    try:
        if source.kind == "gguf":  # the vocabulary and chat template stored in the file
            tokenizer = gguf_models.load_tokenizer(str(source.path))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as error:
        hint = "train.py saves one beside every model and adapter"
        raise EvalError(f"{source.path}: no usable tokenizer ({hint}): {error}") from None
    if template_file is not None:
        tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise EvalError(
            f"{source.path}: the tokenizer has no chat template, so prompts cannot be rendered "
            "(give one with --prompt_template_file)"
        )
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, tokenizer: Any, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        from chattune.evaluation.llama_cpp import LlamaCppModel

        return LlamaCppModel(source.path, tokenizer, device)
    if source.kind == "model":
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    else:
        model = _load_adapter(source, tokenizer, dtype)
    return model.to(device).eval()


def _load_adapter(source: ModelSource, tokenizer: Any, dtype: Any) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from chattune.models.tokenizer import resize_embeddings

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
