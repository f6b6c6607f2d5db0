"""The model evaluate.py generates with: a model or LoRA adapter in transformers on its device, or a GGUF file in
llama.cpp; and its tokenizer, set up for batched generation. Loading itself is chattune.models'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chattune.evaluation.inputs import EvalError
from chattune.models.folders import ModelSource


def generation_tokenizer(source: ModelSource, template_file: str | None = None) -> Any:
    """The model's tokenizer (a GGUF file's vocabulary and chat template are the file's), its chat template replaced
    by `template_file`'s when one is given, padded on the left for batched generation."""
    from chattune.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source.path)
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


def open_model(source: ModelSource, tokenizer: Any, device: str, dtype: Any) -> Any:
    """The model to generate with: a GGUF file in llama.cpp, else the model or adapter on `device`, in eval mode."""
    # Imported here: evaluate.py --help answers without torch (chattune.models.loading imports it).
    from chattune.models.loading import load_adapter, load_model

    if source.kind == "gguf":
        from chattune.evaluation.llama_cpp import LlamaCppModel

        return LlamaCppModel(source.path, tokenizer, device)
    if source.kind == "adapter":
        model = load_adapter(source.path, str(source.base), tokenizer, dtype)
    else:
        model = load_model(str(source.path), dtype)
    return model.to(device).eval()
