"""The GGUF as it ships: scored in llama.cpp by evaluate.py, and quantized to k-quants by llama.cpp's quantizer.

Everything here needs llama-cpp-python (CI builds it; see .ci/run) and skips with that reason without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from chattune.evaluation.inputs import EvalError
from chattune.export.gguf import export_gguf
from conftest import make_tiny_model, run_script, write_jsonl

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")

from chattune.evaluation import generation, inputs  # noqa: E402
from chattune.evaluation.llama_cpp import LlamaCppModel, load_llama  # noqa: E402
from chattune.evaluation.runtime import generation_tokenizer, open_model  # noqa: E402
from chattune.models.folders import inspect_model_folder  # noqa: E402


def conversations(n: int = 6) -> list[dict]:
    devices = "light.kitchen 'Kitchen Light' = off; fan.bedroom 'Bedroom Fan' = on"
    return [
        {
            "messages": [
                {"role": "system", "content": f"You control the house. Devices: {devices}"},
                {"role": "user", "content": f"turn on the kitchen light {i}"},
                {
                    "role": "assistant",
                    "content": f"Turning it on ({i}).\n```homeassistant\n"
                    '{"service": "light.turn_on", "target_device": "light.kitchen"}\n```',
                },  # fmt: skip
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_f32(tiny_model_dir, tmp_path_factory) -> Path:
    """The session's tiny model as an f32 GGUF: llama.cpp then differs from transformers only by its f16 KV
    cache and summation order."""
    return export_gguf(tiny_model_dir, "f32", out=tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def test_replies_and_likelihoods_match_transformers(tiny_model_dir, tiny_f32, tmp_path):
    import torch

    from chattune.data.masking import ChatMasker

    source = inspect_model_folder(tiny_model_dir)
    tokenizer = generation_tokenizer(source)
    hf_model = open_model(source, tokenizer, "cpu", torch.float32)
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", conversations())))
    texts = generation.render_prompt_texts(tokenizer, examples)
    prompts = generation.render_prompts(tokenizer, examples)
    continuations = generation.reference_continuations(ChatMasker(tokenizer), examples, prompts)
    expected, expected_nlls = generation.generate_replies(hf_model, tokenizer, prompts, 3, 12, "cpu", continuations)

    gguf_source = inspect_model_folder(tiny_f32, gguf_runtime="llama.cpp")
    assert gguf_source.kind == "gguf" and gguf_source.results_dir == tiny_f32.parent / "tiny-f32-eval"
    model = open_model(gguf_source, generation_tokenizer(gguf_source), "cpu", None)
    assert isinstance(model, LlamaCppModel)
    replies, nlls = model.generate_replies(texts, prompts, 12, continuations, progress=False)
    model.close()

    assert model.tokenization_mismatches == 0
    assert replies == expected
    for (nll, count), (expected_nll, expected_count) in zip(nlls, expected_nlls):
        assert count == expected_count
        assert nll == pytest.approx(expected_nll, rel=1e-3)


def test_evaluate_cli_scores_the_gguf_with_the_same_keys(tiny_model_dir, tiny_f32, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", conversations(4))
    common = ["--test_dataset", str(data), "--max_new_tokens", "8"]
    hf = run_script("evaluate.py", str(tiny_model_dir), *common, "--output_dir", str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr
    ran = run_script("evaluate.py", str(tiny_f32), *common, "--gguf_runtime", "llama.cpp")
    assert ran.returncode == 0, ran.stderr
    written = json.loads((tiny_f32.parent / "tiny-f32-eval" / "eval_results.json").read_text())
    reference = json.loads((tmp_path / "hf" / "eval_results.json").read_text())
    assert written.keys() == reference.keys()
    assert written["summary"].keys() == reference["summary"].keys()
    timing = ("latency_mean_s", "latency_p95_s")
    for key, value in reference["summary"].items():
        if key not in timing and not isinstance(value, dict | str):  # "task" names the scorer
            assert written["summary"][key] == (value if value is None else pytest.approx(value, rel=1e-2)), key
    assert written["settings"].keys() - reference["settings"].keys() == {"tokenization_mismatches"}
    assert written["settings"]["runtime"] == "llama.cpp" and written["settings"]["dtype"] == "F32"
    assert written["settings"]["tokenization_mismatches"] == 0


def test_compare_prints_one_row_per_model(tiny_model_dir, tiny_f32, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", conversations(2))
    ran = run_script(
        "evaluate.py", "--compare", str(tiny_model_dir), str(tiny_f32), "--test_dataset", str(data),
        "--max_new_tokens", "4", "--gguf_runtime", "llama.cpp", "--output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    rows = [line for line in ran.stdout.splitlines() if line.startswith(("tiny-f32.gguf", tiny_model_dir.name))]
    assert len(rows) == 2, ran.stdout


@pytest.mark.parametrize("damage", ["truncated", "not_gguf"])
def test_a_damaged_gguf_is_named(tiny_f32, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny_f32.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"PK\x03\x04 not a gguf file" * 64)
    with pytest.raises(Exception) as caught:
        LlamaCppModel(bad, tokenizer=None)
    assert str(bad) in str(caught.value)
    assert isinstance(caught.value, (EvalError, ValueError))


# --- k-quants, by llama.cpp's quantizer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_model_dir(test_tokenizer_dir, tmp_path_factory) -> Path:
    """256 wide: k-quant blocks are 256 values, so narrower rows would all fall back to other types."""
    return make_tiny_model(test_tokenizer_dir, tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize(("outtype", "matrix_types"), [("q4_k_m", {"Q4_K", "Q6_K"}), ("q5_k_m", {"Q5_K", "Q6_K"})])
def test_k_quant_export_is_made_by_llama_cpp(wide_model_dir, tmp_path, outtype, matrix_types):
    path = export_gguf(wide_model_dir, outtype, out=tmp_path / "out" / f"m-{outtype}.gguf")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the f16 intermediate is gone
    reader = gguf.GGUFReader(path)
    file_type = reader.fields["general.file_type"]
    assert gguf.LlamaFileType(int(file_type.parts[file_type.data[0]][0])).name == f"MOSTLY_{outtype.upper()}"
    assert matrix_types <= {t.tensor_type.name for t in reader.tensors}
    llm = load_llama(path, n_ctx=64)
    assert llm.n_vocab() > 0
    llm.close()


def test_unknown_quant_type_lists_the_valid_ones(wide_model_dir, tmp_path):
    with pytest.raises(ValueError, match="q4_k_m.*q6_k"):
        export_gguf(wide_model_dir, "q4_k_x", out=tmp_path / "m.gguf")
    ran = run_script("-m", "chattune.export.gguf", str(wide_model_dir), "--outtype", "q4_k_x")
    assert ran.returncode == 2 and "q5_k_m" in ran.stderr
    assert not list(tmp_path.iterdir())


def test_missing_quantizer_fails_before_writing(wide_model_dir, tmp_path, monkeypatch):
    import importlib.util

    from chattune.export.quantize import QuantizeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(QuantizeError, match="pip install llama-cpp-python"):
        export_gguf(wide_model_dir, "q4_k_m", out=tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_amx_builds_load_without_repacking(tiny_f32, monkeypatch):
    """llama.cpp's AMX backend can segfault (llama.cpp #20824); a build holding it loads without repacking, and
    the default parameters are restored after."""
    from chattune.evaluation import llama_cpp as module

    defaults = llama_cpp.llama_cpp.llama_model_default_params
    seen = []

    def spy() -> object:
        params = defaults()
        seen.append(params)
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", spy)
    monkeypatch.setattr(module, "built_with_amx", lambda _: True)
    llm = load_llama(tiny_f32, n_ctx=64)
    llm.close()
    assert seen and seen[-1].use_extra_bufts is False
    assert llama_cpp.llama_cpp.llama_model_default_params is spy
