"""DPO's shared prompts (chattune.training.kernels.shared_prefix): one pass over each pair's prompt, exactly TRL's
result."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.training.kernels import shared_prefix
from chattune.training.kernels.attention import VARLEN_SDPA, branched_runs, use_varlen_sdpa
from chattune.training.kernels.shared_prefix import LeanDPO, pack_pairs, packable, share_prompts
from chattune.training.trainers.preference import load_pairs
from conftest import write_jsonl

TOLERANCE = 2e-5


def varied_pairs(n: int = 6) -> list[dict]:
    """Prompts and answers of different lengths, so that rows are padded and prefixes differ."""
    return [
        {
            "system": "You control the house." + " Devices: light.kitchen, fan.office." * (i % 3),
            "question": f"Turn on the kitchen light {i}" + " please" * i,
            "chosen": f'Turning it on.\n```homeassistant\n{{"service": "light.turn_on", "n": {i}}}\n```',
            "rejected": "I cannot help with that." if i % 2 else "Turning it off. " * (i + 1),
        }
        for i in range(n)
    ]


def load(path, attention: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)


def test_a_branch_sees_its_prefix_and_itself_only(tiny_model_dir):
    """A row [prompt, answer A, answer B branching back to the prompt's end] gives each answer the hidden states
    it has after the prompt alone, with plain SDPA."""
    stock, packed = load(tiny_model_dir), load(tiny_model_dir)
    assert use_varlen_sdpa(packed)
    prompt, first, second = torch.arange(3, 12), torch.arange(20, 26), torch.arange(30, 33)
    row = torch.cat([prompt, first, second])[None]
    positions = torch.cat([torch.arange(15), torch.arange(9, 12)])[None]
    hidden = packed.model(input_ids=row, position_ids=positions).last_hidden_state[0]
    expected_first = stock.model(input_ids=torch.cat([prompt, first])[None]).last_hidden_state[0]
    expected_second = stock.model(input_ids=torch.cat([prompt, second])[None]).last_hidden_state[0]
    torch.testing.assert_close(hidden[:15], expected_first, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(hidden[15:], expected_second[9:], atol=TOLERANCE, rtol=TOLERANCE)


def test_runs_of_a_branched_row():
    positions = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1]])
    assert branched_runs(positions, 1, positions.shape[1]) == [
        (0, 5, 0, 0),
        (5, 7, 0, 2),
        (7, 10, 7, 0),
        (10, 11, 7, 1),
    ]
    assert branched_runs(torch.tensor([[0, 1, 2, 0, 1]]), 1, 5) is None  # plain packed examples
    with pytest.raises(ValueError, match="past the 2 tokens"):
        branched_runs(torch.tensor([[0, 1, 5, 6]]), 1, 4)


def test_pairs_are_packed_with_their_common_prefix_once():
    # pair 0: rejected shares 2 tokens; pair 1: rejected is a prefix of chosen; right padding with 0
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0], [5, 6, 9, 0], [5, 6, 0, 0]])
    mask = (torch.arange(4) < torch.tensor([[4], [3], [3], [2]])).long()
    packed = pack_pairs(input_ids, mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert packed.gather[2, :3].tolist() == [0, 1, 4] and packed.gather[3, :2].tolist() == [5, 6]
    assert (packed.input_ids[0][packed.gather] * packed.real == input_ids).all()


@pytest.mark.parametrize(
    "input_ids, mask, extra, expected",
    [
        ([[1, 2], [1, 3]], [[1, 1], [1, 1]], {"use_cache": False}, True),
        ([[1, 2], [1, 3]], [[1, 1], [0, 1]], {}, False),  # left padding
        ([[1, 2], [1, 3], [1, 4]], [[1, 1]] * 3, {}, False),  # not chosen + rejected rows
        ([[1, 2], [1, 3]], [[1, 1], [1, 1]], {"use_cache": True}, False),
        ([[1, 2], [1, 3]], [[1, 1], [1, 1]], {"output_router_logits": True}, False),
        ([[1, 2], [1, 3]], [[1, 1], [1, 1]], {"inputs_embeds": None, "output_hidden_states": None}, True),  # PEFT's
        ([[1, 2], [1, 3]], [[1, 1], [1, 1]], {"output_hidden_states": True}, False),
    ],
)
def test_only_trls_pair_layout_is_packed(input_ids, mask, extra, expected):
    assert packable(torch.tensor(input_ids), torch.tensor(mask), extra) is expected


def dpo_trainer(tiny_model_dir, tmp_path, lora: bool):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model = load(tiny_model_dir)
    assert share_prompts(model) and model.config._attn_implementation == VARLEN_SDPA
    rows = load_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", varied_pairs())))
    config = DPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, report_to="none", use_cpu=True, max_length=256
    )
    trainer_class = type("DPOTrainer", (LeanDPO, DPOTrainer), {})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft_config = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False) if lora else None
    reference = None if lora else copy.deepcopy(model).eval()
    return trainer_class(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_loss_metrics_and_gradients_are_trls(tiny_model_dir, tmp_path, monkeypatch, lora):
    """The lean pass (shared prompts, the answers' positions only in the head) against TRL's own two padded rows
    per pair: same loss, metrics and gradients, for the policy and for the reference (a model copy, or the
    adapter switched off)."""
    from trl import DPOTrainer
    from trl.trainer import utils as trl_utils

    trainer = dpo_trainer(tiny_model_dir, tmp_path, lora)
    trainer.model.train()  # TRL logs its metrics under "train" in training mode
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # padded rows: the case where packing changes the layout
    packs, projected = [], []
    monkeypatch.setattr(shared_prefix, "pack_pairs", lambda *args: packs.append(1) or pack_pairs(*args))
    head = trl_utils._ChunkedLogProbFunction

    class CountingHead:  # the rows TRL's fused head projects
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return head.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingHead)
    results = {}
    for name, compute in (("shared", trainer._compute_loss), ("trl", DPOTrainer._compute_loss.__get__(trainer))):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = compute(trainer.model, batch, False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[name] = loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads
        if name == "shared":
            assert len(packs) == 2  # the policy and the reference passes were packed; TRL's own were not
            labelled = int((batch["completion_mask"][:, 1:] != 0).sum())
            assert projected == [labelled, labelled]  # the answers' positions only, not prompts and padding
    assert projected[2:] == [batch["input_ids"][:, 1:].numel()] * 2  # TRL on a CPU: every position
    (loss, metrics, grads), (trl_loss, trl_metrics, trl_grads) = results["shared"], results["trl"]
    assert packs == [1, 1]
    torch.testing.assert_close(loss, trl_loss, atol=TOLERANCE, rtol=TOLERANCE)
    assert metrics.keys() == trl_metrics.keys() and "rewards/margins" in metrics
    for key, value in metrics.items():
        if key == "num_tokens":  # a running total over both calls
            continue
        assert value == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-4), key  # rewards start near 0
    assert grads.keys() == trl_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=TOLERANCE, rtol=1e-4, msg=name)


def test_the_backbone_is_given_back_after_each_pass(tiny_model_dir):
    model = load(tiny_model_dir)
    share_prompts(model)
    with shared_prefix.shared_prefixes(model, None):
        assert "forward" in model.model.__dict__
    assert "forward" not in model.model.__dict__


def test_prompts_are_not_shared_where_attention_cannot_branch(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="chattune.training.kernels.shared_prefix")
    eager = load(tiny_model_dir, attention="eager")
    assert not share_prompts(eager) and eager.config._attn_implementation == "eager"
    assert not share_prompts(load(tiny_model_dir), per_example_attention=False)
    assert "two padded rows" in caplog.text and "--attn_implementation was given" in caplog.text
    with shared_prefix.shared_prefixes(eager):
        assert "forward" not in eager.model.__dict__
