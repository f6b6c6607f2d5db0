"""Padding-free micro-batches and --packing rows never let examples see each other or each other's labels.

The batches come from the trainer chattune builds (chattune.training.trainers.sft.build_trainer: TRL's collator with
padding_free=True; with --packing, TRL's bfd `pack_dataset` into rows of ctx_size, then the same
collator). Each example of a batch is then run alone through the same tiny random-weight Llama (fp32,
eval mode), and its summed and mean loss over its labelled tokens must not change.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler

from chattune.config.flags import TrainFlags
from chattune.data.masking import IGNORE_INDEX, ChatMasker
from chattune.data.tokenization import tokenize_dataset
from chattune.training.kernels.attention import VARLEN_SDPA, has_sliding_window, use_varlen_sdpa
from chattune.training.kernels.batching import plan_batching
from chattune.training.trainers.sft import build_trainer
from conftest import TRAIN, chat_rows, run_script, train_argv, write_jsonl

TOLERANCE = 1e-5
CTX_SIZE = 384  # examples are 100-127 tokens: packed rows hold three of them
MICRO_BATCH = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def dataset(tokenizer) -> Dataset:
    """Chat rows tokenized and masked by chattune (assistant-only labels), one and two assistant turns."""
    rows = Dataset.from_list(chat_rows(24))
    data, _ = tokenize_dataset(rows, tokenizer, ChatMasker(tokenizer), source="rows", ctx_size=CTX_SIZE)
    return data


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(tiny_model_dir, request):
    """sdpa becomes chattune's per-example SDPA in plan_batching; eager keeps transformers' block mask."""
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    ).eval()


def make_trainer(model, tokenizer, dataset, out, packing: bool = False, group_by_length: bool = False):
    flags = TrainFlags(
        run_name="packing",
        base_model="tiny",
        train_dataset="rows",
        output_dir=str(out),
        ctx_size=CTX_SIZE,
        batch_size=MICRO_BATCH,
        micro_batch_size=MICRO_BATCH,
        packing=packing,
        group_by_length=group_by_length,
        report_to="none",
    )
    attention = model.config._attn_implementation
    plan = plan_batching(model, packing)
    assert plan.padding_free and plan.packing == packing
    assert model.config._attn_implementation == (VARLEN_SDPA if attention in ("sdpa", VARLEN_SDPA) else attention)
    return build_trainer(flags, model, tokenizer, dataset, None, plan, torch.float32)


def epoch_batches(trainer) -> list[dict]:
    return list(trainer.get_train_dataloader())


def example_spans(batch: dict) -> list[slice]:
    """Where each example sits in a flattened batch: position ids restart at 0 for every example."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    ends = starts[1:] + [batch["position_ids"].shape[1]]
    return [slice(start, end) for start, end in zip(starts, ends)]


def labelled_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the labelled tokens of one example, and how many there are."""
    targets = labels[1:]
    nll = F.cross_entropy(logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())


def forward(model, batch: dict) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        # use_cache=False as TRL passes it: with a cache, transformers skips its packed-sequence mask
        return model(**inputs, use_cache=False).logits[0]


def alone(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids[None], use_cache=False).logits[0]


def check_batch(model, batch: dict, originals: dict[tuple, list[int]]) -> list[tuple]:
    """Every example of the batch: same loss as alone, and its own assistant-only labels; returns their ids."""
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flattened row
    logits, seen = forward(model, batch), []
    for span in example_spans(batch):
        ids, labels = batch["input_ids"][0, span], batch["labels"][0, span]
        key = tuple(ids.tolist())
        assert key in originals, "an example was cut or merged with another"
        assert labels[0] == IGNORE_INDEX, "the first token of an example must not be predicted from the one before"
        assert labels.tolist() == originals[key], "labels changed on the way into the batch"
        packed_sum, count = labelled_nll(logits[span], labels)
        alone_sum, alone_count = labelled_nll(alone(model, ids), labels)
        assert count == alone_count > 0
        torch.testing.assert_close(packed_sum, alone_sum, atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(packed_sum / count, alone_sum / count, atol=TOLERANCE, rtol=TOLERANCE)
        seen.append(key)
    return seen


def originals_of(dataset: Dataset) -> dict[tuple, list[int]]:
    originals = {tuple(row["input_ids"]): row["labels"] for row in dataset}
    assert len(originals) == len(dataset)  # every example is distinct, so each can be found again
    assert all(labels[0] == IGNORE_INDEX for labels in originals.values())  # chattune never labels the 1st token
    return originals


def test_padding_free_micro_batches_isolate_examples(model, tokenizer, dataset, tmp_path):
    trainer = make_trainer(model, tokenizer, dataset, tmp_path)
    assert trainer.data_collator.padding_free and not trainer.args.packing
    originals = originals_of(dataset)
    seen = []
    for batch in epoch_batches(trainer):
        keys = check_batch(model, batch, originals)
        assert len(keys) <= MICRO_BATCH
        seen += keys
    assert sorted(seen) == sorted(originals), "each example once per epoch"


def test_packed_rows_isolate_examples(model, tokenizer, dataset, tmp_path):
    trainer = make_trainer(model, tokenizer, dataset, tmp_path, packing=True)
    assert trainer.args.packing and trainer.args.packing_strategy == "bfd" and trainer.data_collator.padding_free
    rows = trainer.train_dataset
    assert "seq_lengths" in rows.column_names and len(rows) < len(dataset)
    for row in rows:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= CTX_SIZE
    assert max(len(row["seq_lengths"]) for row in rows) >= 3, "rows should hold several examples"
    originals = originals_of(dataset)
    seen = []
    for batch in epoch_batches(trainer):
        seen += check_batch(model, batch, originals)
    assert sorted(seen) == sorted(originals), "bfd packing kept every example whole, once"


def test_the_check_notices_attention_across_examples(model, tokenizer, dataset, tmp_path):
    """Control: the same batch with positions that run on (one long sequence) fails the comparison."""
    trainer = make_trainer(model, tokenizer, dataset, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    spans = example_spans(batch)
    assert len(spans) > 1
    leaky = {"input_ids": batch["input_ids"], "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    second = spans[1]
    leaked, _ = labelled_nll(forward(model, leaky)[second], batch["labels"][0, second])
    isolated, _ = labelled_nll(alone(model, batch["input_ids"][0, second]), batch["labels"][0, second])
    assert (leaked - isolated).abs() > 100 * TOLERANCE


def test_group_by_length_batches(model, tokenizer, dataset, tmp_path):
    trainer = make_trainer(model, tokenizer, dataset, tmp_path, group_by_length=True)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    originals, seen = originals_of(dataset), []
    for batch in epoch_batches(trainer):
        seen += check_batch(model, batch, originals)
    assert sorted(seen) == sorted(originals)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--group_by_length", "--packing"])
def test_train_py_runs(tiny_model_dir, tmp_path, flag):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    argv = train_argv(
        tiny_model_dir, data, tmp_path, flag, max_steps=2, ctx_size=CTX_SIZE, save_steps=100, logging_steps=1
    )
    result = run_script(TRAIN, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "run" / "model.safetensors").is_file()
    assert ("packed rows" if flag == "--packing" else "padding-free micro-batches") in result.stderr


def test_varlen_sdpa_matches_the_block_diagonal_mask_and_its_gradients(tiny_model_dir, tokenizer, dataset, tmp_path):
    """Per-example SDPA against transformers' own packed-sequence mask: same logits, same gradients."""
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert use_varlen_sdpa(varlen) and stock.config._attn_implementation == "sdpa"
    batch = next(iter(make_trainer(stock, tokenizer, dataset, tmp_path).get_train_dataloader()))
    assert len(example_spans(batch)) > 1
    losses = []
    for model in (stock, varlen):
        output = model(**batch, use_cache=False)
        output.loss.backward()
        losses.append(output)
    torch.testing.assert_close(losses[0].logits, losses[1].logits, atol=TOLERANCE, rtol=TOLERANCE)
    for (name, a), (_, b) in zip(stock.named_parameters(), varlen.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=TOLERANCE, rtol=1e-4, msg=name)


def test_varlen_sdpa_generates_like_sdpa_with_left_padding(tiny_model_dir, tokenizer):
    """Evaluation during training may generate: padded batches and the KV cache take SDPA's own path."""
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    use_varlen_sdpa(varlen)
    tokenizer.padding_side = "left"
    inputs = tokenizer(["turn on the light", "hi"], return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert stock.generate(**inputs, **settings).tolist() == varlen.generate(**inputs, **settings).tolist()


def test_sliding_window_models_keep_the_stock_mask(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.sliding_window = 64
    assert has_sliding_window(model.config) and not use_varlen_sdpa(model)
    assert model.config._attn_implementation == "sdpa"
    assert plan_batching(model, packing=False).padding_free and model.config._attn_implementation == "sdpa"
