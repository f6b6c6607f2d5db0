"""chattune.models, the one home of model access: one load_tokenizer and one load_model for every command, and the
one-line errors they give for a model that cannot be used."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chattune.models.device import pick_device, pick_dtype
from chattune.models.errors import ModelError
from chattune.models.folders import inspect_model_folder
from chattune.models.loading import load_adapter, load_model
from chattune.models.tokenizer import load_tokenizer


def test_load_tokenizer_reads_a_model_folder(tiny_model_dir, test_tokenizer):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.get_vocab() == test_tokenizer.get_vocab()


def test_a_folder_without_a_tokenizer_is_one_line_naming_it(tmp_path):
    with pytest.raises(ModelError) as caught:
        load_tokenizer(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: no usable tokenizer") and "\n" not in message


def test_load_model_loads_in_the_dtype_asked(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.bfloat16, attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_an_adapter_whose_base_is_missing_names_its_adapter_config(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="cannot load the base model .* named in adapter_config.json"):
        load_adapter(adapter, str(tmp_path / "gone"), load_tokenizer(tiny_model_dir), torch.float32)


def test_a_folder_is_told_from_an_adapter_and_truncated_weights_refused(tmp_path, tiny_model_dir):
    assert inspect_model_folder(tiny_model_dir).kind == "model"
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="model.safetensors: truncated or corrupt"):
        inspect_model_folder(copy)


def test_cuda_asked_where_torch_sees_none_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    with pytest.raises(ModelError, match="--device cuda: no CUDA GPU"):
        pick_device("cuda")
    assert pick_dtype("float16", "cpu") == torch.float16
