"""Training knobs: precision (--fp16), optimizer and schedule (--optimizer, --min_learning_rate, --warmup_epochs) and
LoRA variants (--use_dora, --use_rslora, --lora_init), on CPU with tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from chattune.config.flags import FlagError, parse_flags
from chattune.models.loading import FP16_NEEDS_GPU, choose_dtype, weight_dtype
from chattune.training.adapters.loftq import check_loftq_weights, init_loftq
from chattune.training.adapters.lora import lora_config, upcast_trainable_parameters
from chattune.training.trainers.arguments import check_optimizer, set_warmup_epochs, training_args
from conftest import TRAIN, chat_rows, run_script, train_argv, write_jsonl

REQUIRED = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(16))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--fp16", "--bf16"], "--fp16 and --bf16 contradict each other"),
        (["--fp16", "--pure_bf16"], "contradicts --fp16"),
        (["--optimizer", "adamw_8bti"], "did you mean adamw_8bit?"),
        (["--optimizer", "adam"], "is not a transformers optimizer"),
        (["--min_learning_rate", "1e-6", "--min_learning_rate_ratio", "0.1"], "not both"),
        (["--learning_rate", "1e-5", "--min_learning_rate", "1e-4"], "below --learning_rate"),
        (["--min_learning_rate_ratio", "1.5"], "must be in [0, 1)"),
        (["--learning_rate_schedule", "linear", "--min_learning_rate", "0"], "floor of the cosine schedule"),
        (["--warmup_epochs", "1", "--learning_rate_warmup", "0.1"], "not both"),
        (["--warmup_epochs", "-1"], "at least 0"),
        (["--dpo", "--loss_reduction", "sequences"], "--method dpo has its own loss"),
        (["--loss_reduction", "mean"], "invalid choice: 'mean'"),
        (["--use_dora"], "--use_dora shape(s) a LoRA adapter: add --use_lora"),
        (["--use_rslora", "--lora_init", "pissa"], "--use_rslora, --lora_init pissa shape(s) a LoRA adapter"),
        (["--use_lora", "--load_in_4bit", "--lora_init", "pissa"], "a quantized base cannot take"),
        (["--use_lora", "--load_in_8bit", "--lora_init", "olora"], "a quantized base cannot take"),
        (["--use_lora", "--lora_init", "loftq"], "add --load_in_4bit"),
        (["--use_lora", "--load_in_4bit", "--lora_init", "loftq", "--use_dora"], "DoRA's magnitudes"),
        (["--use_lora", "--lora_init", "eva"], "invalid choice: 'eva'"),
    ],
)
def test_contradictory_knobs_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_flags([*REQUIRED, *extra])
    assert message in capsys.readouterr().err


def test_fp16_is_refused_on_a_cpu_before_any_work(tmp_path, monkeypatch):
    from chattune.commands import train as run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "resolve_model", lambda *a: pytest.fail("reached model loading"))
    argv = train_argv("no/such/model", tmp_path / "missing.jsonl", tmp_path, "--fp16")
    assert run.main(argv) == 2
    with pytest.raises(FlagError, match="--fp16 needs a CUDA GPU"):
        choose_dtype(bf16=False, fp16=True)
    assert "T4, V100" in FP16_NEEDS_GPU and "--bf16" in FP16_NEEDS_GPU


def test_fp16_compute_and_weight_dtypes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_dtype(bf16=False, fp16=True) is torch.float16
    full, lora = parse_flags([*REQUIRED, "--fp16"]), parse_flags([*REQUIRED, "--fp16", "--use_lora"])
    assert weight_dtype(full, torch.float16) is torch.float32  # fp32 master weights under fp16 autocast
    assert weight_dtype(lora, torch.float16) is torch.float16  # the frozen base
    args = training_args(full, torch.float16, has_eval=False)
    assert args["fp16"] is True and args["bf16"] is False


def test_trained_float16_parameters_are_upcast(tiny_model_dir):
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    flags = parse_flags([*REQUIRED, "--use_lora", "--lora_modules_to_save", "embed_tokens"])
    peft_model = get_peft_model(model, lora_config(flags, model, tokens_added=False))
    assert any(p.requires_grad and p.dtype == torch.float16 for p in peft_model.parameters())  # the embedding copy
    upcast_trainable_parameters(peft_model)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert any(p.dtype == torch.float16 for p in peft_model.parameters() if not p.requires_grad)


def test_optimizer_and_schedule_arguments():
    flags = parse_flags([*REQUIRED, "--optimizer", "paged_adamw_8bit", "--min_learning_rate", "1e-6"])
    args = training_args(flags, torch.float32, has_eval=False)
    assert args["optim"] == "paged_adamw_8bit"
    assert args["lr_scheduler_type"] == "cosine_with_min_lr" and args["lr_scheduler_kwargs"] == {"min_lr": 1e-6}
    ratio = training_args(parse_flags([*REQUIRED, "--min_learning_rate_ratio", "0.1"]), torch.float32, False)
    assert ratio["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    plain = training_args(parse_flags([*REQUIRED, "--learning_rate_schedule", "linear"]), torch.float32, False)
    assert plain["lr_scheduler_type"] == "linear" and "optim" not in plain  # transformers' default optimizer


def test_an_optimizer_without_its_package_is_refused():
    import importlib.util

    check_optimizer(parse_flags([*REQUIRED, "--optimizer", "adamw_8bit"]))  # bitsandbytes runs on this CPU
    if importlib.util.find_spec("galore_torch") is None:
        with pytest.raises(FlagError, match="--optimizer galore_adamw: .*galore_torch"):
            check_optimizer(parse_flags([*REQUIRED, "--optimizer", "galore_adamw"]))


@pytest.mark.parametrize(
    "rows,micro,processes,accumulation,epochs,expected",
    [(24, 2, 1, 2, 0.5, 3), (24, 2, 2, 1, 1, 6), (25, 2, 1, 2, 0.25, 2), (10, 4, 1, 1, 0, 0), (4, 2, 1, 2, 0.1, 1)],
)
def test_warmup_epochs_become_whole_steps(rows, micro, processes, accumulation, epochs, expected):
    flags = parse_flags([*REQUIRED, "--warmup_epochs", str(epochs)])
    args = SimpleNamespace(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, warmup_steps=0)
    trainer = SimpleNamespace(args=args, train_dataset=list(range(rows)))
    set_warmup_epochs(trainer, flags, processes)
    assert args.warmup_steps == expected


def test_8bit_optimizer_warmup_epochs_and_cosine_floor(tiny_model_dir, dataset, tmp_path):
    """16 rows, 4 per step: 4 steps per epoch; 2 epochs; warm-up 1 epoch; floor 0.5 x peak."""
    flags = dict(batch_size=4, epochs=2, learning_rate="1e-3", logging_steps=1, save_steps=8)
    extra = ["--optimizer", "adamw_8bit", "--warmup_epochs", "1", "--min_learning_rate_ratio", "0.5"]
    result = run_script(TRAIN, *train_argv(tiny_model_dir, dataset, tmp_path, *extra, **flags))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "run" / "checkpoint-8"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert len(rates) == 8
    assert rates[:5] == sorted(rates[:5]) and rates[4] == pytest.approx(1e-3)  # 4 warm-up steps, then the peak
    assert rates[5:] == sorted(rates[5:], reverse=True) and min(rates[5:]) >= 0.5e-3
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    # bitsandbytes keeps 8-bit moments for tensors of 4096 elements and more (here the embeddings and MLPs)
    quantized = [state.get("__bnb_optimizer_quant_state__", state) for state in optimizer_state.values()]
    moments = [state["state1"].dtype for state in quantized if "state1" in state]
    assert moments.count(torch.uint8) >= 4, moments


def test_loftq_is_refused_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    flags = parse_flags(
        ["--run_name", "r", "--base_model", str(tmp_path), "--train_dataset", "d.jsonl"]
        + ["--use_lora", "--load_in_4bit", "--lora_init", "loftq"]
    )
    with pytest.raises(FlagError, match="has none"):
        check_loftq_weights(flags)


def test_loftq_starts_closer_to_the_original_weights(tiny_model_dir):
    """Q + scaling * B @ A after LoftQ is nearer the unquantized model than QLoRA's start (B = 0)."""
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 60]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits

    def error(init: bool) -> float:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant)
        flags = parse_flags([*REQUIRED, "--use_lora", "--load_in_4bit", "--lora_rank", "8", "--lora_alpha", "32"])
        model = get_peft_model(model, lora_config(flags, model, tokens_added=False)).eval()
        if init:
            assert init_loftq(model, str(tiny_model_dir)) == 14  # 7 projections x 2 blocks
        with torch.no_grad():
            return (model(ids).logits - original).abs().mean().item()

    qlora, loftq = error(False), error(True)
    assert loftq < 0.8 * qlora, (loftq, qlora)


@pytest.mark.parametrize(
    "variant",
    [["--use_dora"], ["--use_rslora"], ["--lora_init", "pissa"], ["--lora_init", "olora"], ["--lora_init", "gaussian"]],
    ids=["dora", "rslora", "pissa", "olora", "gaussian"],
)
def test_lora_variant_merge_matches_adapter(tiny_model_dir, dataset, tmp_path, variant):
    """The adapter, loaded on the original base as evaluate.py and a multi-process merge do, equals the merged model."""
    from peft import PeftModel

    extra = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--lora_merge", *variant]
    result = run_script(
        TRAIN, *train_argv(tiny_model_dir, dataset, tmp_path, *extra, max_steps=3, learning_rate="1e-2", save_steps=3)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter_dir, merged_dir = tmp_path / "loras" / "run", tmp_path / "models" / "run"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] == ("--use_dora" in variant) and config["use_rslora"] == ("--use_rslora" in variant)
    assert config["init_lora_weights"] == (variant[1] if variant[0] == "--lora_init" else True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapter_logits = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3, "the adapter changed nothing"
    assert (merged_logits - adapter_logits).abs().max() < 1e-4


def test_loftq_merge_matches_the_quantized_model_with_its_adapter(tiny_model_dir, dataset, tmp_path):
    """LoftQ's adapter learned the quantization error, so the merge folds it into the dequantized 4-bit weights: the
    merged model equals the trained one (4-bit base + adapter), not the full-precision base + adapter."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    extra = ["--use_lora", "--load_in_4bit", "--lora_init", "loftq", "--lora_merge"]
    result = run_script(
        TRAIN, *train_argv(tiny_model_dir, dataset, tmp_path, *extra, max_steps=3, learning_rate="1e-2", save_steps=3)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoftQ: 14 adapted layers" in result.stderr
    merged_dir = tmp_path / "models" / "run"
    assert not json.loads((merged_dir / "config.json").read_text()).get("quantization_config")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant), tmp_path / "loras" / "run"
    )
    # train mode without dropout: in eval mode bitsandbytes' CPU kernel repacks the weights and computes in bfloat16
    trained.train()
    for module in trained.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        trained_logits = trained(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        full_base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert (merged_logits - trained_logits).abs().max() < 1e-4
    assert (trained_logits - full_base_logits).abs().max() > 1e-2  # the comparison can tell the bases apart


@pytest.mark.parametrize(
    "saved,extra,message",
    [
        ({"init_lora_weights": "pissa"}, [], "init_lora_weights=pissa, this run asks for default"),
        ({}, ["--lora_init", "olora"], "this run asks for olora"),
        ({"use_dora": True}, [], "use_dora=True, this run asks for False"),
        ({}, ["--use_rslora"], "use_rslora=False, this run asks for True"),
        ({"init_lora_weights": "gaussian"}, [], None),  # an init that only starts the adapter: resumable as is
        ({"init_lora_weights": "pissa", "use_dora": True}, ["--lora_init", "pissa", "--use_dora"], None),
    ],
)
def test_resume_refuses_another_lora_variant(tmp_path, saved, extra, message):
    from chattune.training.safety.resume import check_checkpoint_matches

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, **saved}))
    flags = parse_flags([*REQUIRED, "--use_lora", *extra])
    if message is None:
        check_checkpoint_matches(flags, tmp_path)
    else:
        with pytest.raises(FlagError, match=message.replace("(", r"\(")):
            check_checkpoint_matches(flags, tmp_path)
