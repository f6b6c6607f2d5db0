"""The labelled-positions loss (chattune/training/kernels/loss.py) against the standard full-logits loss, and its
memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

import chattune.training.kernels.loss
from chattune.data.masking import ChatMasker
from chattune.data.tokenization import tokenize_dataset
from chattune.training.kernels.loss import LEAN_LOSS_ENV, _trl_head_is_compact, kept_positions, lean_loss_mode
from chattune.training.trainers.sft import SFTTrainerWithAtomicCheckpoints
from conftest import chat_rows, tiny_config

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    """Chat rows tokenized and masked by chattune: assistant-only labels, lengths that differ."""
    rows = Dataset.from_list(chat_rows(6))
    dataset, _ = tokenize_dataset(rows, tokenizer, ChatMasker(tokenizer), source="rows", ctx_size=512)
    return [dataset[i] for i in range(len(dataset))]


def make_trainer(
    model, tokenizer, examples, tmp_path, padding_free: bool = True, peft: bool = False, loss_reduction: str = "tokens"
):
    config = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(examples),
        padding_free=padding_free,
        max_length=None,
        report_to=[],
        use_cpu=True,
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SFTTrainerWithAtomicCheckpoints(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        loss_reduction=loss_reduction,
    )
    trainer.model.train()  # no dropout in the tiny model: train mode only selects the "train" metrics
    return trainer


@pytest.fixture
def lean_calls(monkeypatch) -> list[int]:
    """Counts the labelled-only forwards, so a silent fall-back to TRL's loss cannot pass for the lean one."""
    calls: list[int] = []
    original = chattune.training.kernels.loss.forward_kept_logits

    def spy(model, inputs, positions, *args):
        calls.append(positions.numel())
        return original(model, inputs, positions, *args)

    monkeypatch.setattr(chattune.training.kernels.loss, "forward_kept_logits", spy)
    return calls


def reference_loss(model, batch: dict, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss on the full logits: shift, sum the NLL, divide by the label count."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return nll / count


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(lean, reference) -> None:
    (lean_loss, lean_grads), (ref_loss, ref_grads) = lean, reference
    torch.testing.assert_close(lean_loss, ref_loss, atol=TOLERANCE, rtol=TOLERANCE)
    assert lean_grads.keys() == ref_grads.keys() and lean_grads
    for name in ref_grads:
        torch.testing.assert_close(lean_grads[name], ref_grads[name], atol=TOLERANCE, rtol=TOLERANCE, msg=name)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
@pytest.mark.parametrize("num_items", [None, 1000], ids=["own-count", "num_items_in_batch"])
@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
def test_loss_and_gradients_equal_full_logits(
    tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch, lean_calls, padding_free, num_items, peft
):
    monkeypatch.setenv(LEAN_LOSS_ENV, "1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, examples, tmp_path, padding_free=padding_free, peft=peft)
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == (1 if padding_free else len(examples))
    model = trainer.model
    lean = loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items))
    assert_same(lean, loss_and_grads(model, lambda: reference_loss(model, batch, num_items)))
    # only the positions before a label were projected, far fewer than the batch's tokens
    assert len(lean_calls) == 1 and 0 < lean_calls[0] < batch["input_ids"].shape[1] / 2


def test_metrics_match_trl_loss(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch, lean_calls):
    """Loss and logged metrics equal TRL's own compute_loss (its fused LM head) on the same batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, examples, tmp_path)
    batch = trainer.data_collator(examples)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(LEAN_LOSS_ENV, mode)
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
        results[mode] = (loss, {key: values[-1] for key, values in trainer._metrics["train"].items()})
    (trl_loss, trl_metrics), (lean_loss, lean_metrics) = results["0"], results["1"]
    assert len(lean_calls) == 1  # "0" took TRL's path, "1" the lean one
    torch.testing.assert_close(lean_loss, trl_loss, atol=TOLERANCE, rtol=TOLERANCE)
    assert lean_metrics.keys() == trl_metrics.keys() >= {"entropy", "mean_token_accuracy", "num_tokens"}
    for key in trl_metrics:
        assert lean_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert lean_metrics["num_tokens"] == sum(len(example["input_ids"]) for example in examples)


def test_padding_free_examples_stay_apart(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    """The summed loss of a padding-free micro-batch is the sum of each example's loss run alone."""
    monkeypatch.setenv(LEAN_LOSS_ENV, "1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, examples, tmp_path)
    batch = trainer.data_collator(examples)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        packed_sum = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=1)
        alone_sum = sum(
            reference_loss(trainer.model, trainer.data_collator([example]), num_items_in_batch=1)
            for example in examples
        )
    assert labelled > 0
    torch.testing.assert_close(packed_sum, alone_sum, atol=TOLERANCE * labelled, rtol=TOLERANCE)


def mean_of_example_means(model, trainer, examples) -> torch.Tensor:
    """--loss_reduction sequences by definition: each example's token-mean loss, run alone, averaged."""
    return sum(reference_loss(model, trainer.data_collator([example])) for example in examples) / len(examples)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_sequences_loss_and_gradients_are_the_mean_of_example_means(
    tiny_model_dir, tokenizer, examples, tmp_path, padding_free
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, examples, tmp_path, padding_free=padding_free, loss_reduction="sequences")
    batch = trainer.data_collator(examples)
    model = trainer.model
    sequences = loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch)))
    assert_same(sequences, loss_and_grads(model, lambda: mean_of_example_means(model, trainer, examples)))
    # the examples differ in length, so the token mean is another number (close: a random model's NLL is flat)
    assert (sequences[0] - reference_loss(model, batch).detach()).abs() > 20 * TOLERANCE


@pytest.mark.parametrize("reduction", ["tokens", "sequences"])
def test_accumulated_micro_batches_equal_one_batch(tiny_model_dir, tokenizer, examples, tmp_path, reduction):
    """The step's count (tokens or examples) comes from all its micro-batches, so their losses add up exactly."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, examples, tmp_path, loss_reduction=reduction)
    model = trainer.model
    micro_batches = [trainer.data_collator(examples[:2]), trainer.data_collator(examples[2:])]
    _, count = trainer.get_batch_samples(iter(micro_batches), 2, torch.device("cpu"))
    if reduction == "sequences":
        assert int(count) == len(examples)

    def accumulated():
        return sum(trainer.compute_loss(model, dict(batch), num_items_in_batch=count) for batch in micro_batches)

    whole = trainer.data_collator(examples)
    one_batch = loss_and_grads(model, lambda: trainer.compute_loss(model, dict(whole)))
    assert_same(loss_and_grads(model, accumulated), one_batch)


def test_sequences_count_skips_examples_without_labels(tokenizer, tmp_path):
    from chattune.training.kernels.loss import labelled_example_count

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    labels = torch.tensor([[-100, 5, 6, -100, -100, -100, -100, -100, 7]])
    assert labelled_example_count({"labels": labels, "position_ids": position_ids}) == 2  # the second has none
    padded = torch.tensor([[-100, 5, -100], [-100, -100, -100], [-100, 3, 4]])
    assert labelled_example_count({"labels": padded}) == 2


def test_kept_positions_are_shifted():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7], [-100, 3, -100, -100, -100, -100, -100]])
    # a logit at t predicts the token at t + 1: row 0 needs 1, 2, 5; row 1 needs 0
    assert kept_positions(labels).tolist() == [0, 1, 2, 5]
    assert kept_positions(torch.full((1, 4), -100)).numel() == 0


def test_switch_and_device_rule(monkeypatch):
    for value, mode in (("0", "off"), ("1", "on"), ("auto", "auto")):
        monkeypatch.setenv(LEAN_LOSS_ENV, value)
        assert lean_loss_mode() == mode
    monkeypatch.delenv(LEAN_LOSS_ENV)
    assert lean_loss_mode() == "auto"
    # on a CPU, TRL's fused head scores every position, so "auto" picks the labelled-only loss
    assert not _trl_head_is_compact(torch.device("cpu"))


def test_all_unlabelled_batch_gives_zero_loss(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    monkeypatch.setenv(LEAN_LOSS_ENV, "1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = make_trainer(model, tokenizer, examples, tmp_path)
    batch = trainer.data_collator(examples)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()  # still connected to the graph: an empty micro-batch must not break backward
    assert loss.item() == 0.0


VOCAB_150K = 150_000


def peak_tensor_bytes(step) -> int:
    """Peak of live tensor bytes allocated during `step`, from the profiler's allocator events.

    torch's CPU allocator reports every allocation and free to the profiler with its size; the running sum
    in time order is the live tensor memory, and its maximum the step's peak above what was live before.
    Unlike RSS it does not depend on glibc returning pages, on other processes, or on what ran earlier in
    the test session, so it is exact and repeatable on a shared CPU.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


def big_vocab_batch(vocab: int) -> dict:
    """Four padding-free examples of 160 tokens, the last 32 of each labelled: an SFT-like label share."""
    generator = torch.Generator().manual_seed(0)
    lengths = [160] * 4
    input_ids = torch.randint(0, vocab, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.full_like(input_ids, -100)
    start = 0
    for n in lengths:
        labels[0, start + n - 32 : start + n] = input_ids[0, start + n - 32 : start + n]
        start += n
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def test_peak_memory_is_lower_with_150k_vocabulary(tokenizer, tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(
        "llama",
        vocab_size=VOCAB_150K,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    trainer = make_trainer(AutoModelForCausalLM.from_config(config), tokenizer, examples, tmp_path)
    model, batch = trainer.model, big_vocab_batch(VOCAB_150K)

    def step(compute):
        def run():
            model.zero_grad(set_to_none=True)
            compute().backward()

        return run

    monkeypatch.setenv(LEAN_LOSS_ENV, "1")
    lean = peak_tensor_bytes(step(lambda: trainer.compute_loss(model, dict(batch))))
    full = peak_tensor_bytes(step(lambda: reference_loss(model, batch)))
    monkeypatch.setenv(LEAN_LOSS_ENV, "0")
    trl = peak_tensor_bytes(step(lambda: trainer.compute_loss(model, dict(batch))))
    # 640 positions x 150k x fp32 = 366 MiB per full-logits copy; 128 labelled positions = 73 MiB
    print(f"peak tensor MiB: lean {lean / 2**20:.0f}, TRL fused head {trl / 2**20:.0f}, full logits {full / 2**20:.0f}")
    assert lean < full / 3, (lean, full)
    assert lean < trl, (lean, trl)
