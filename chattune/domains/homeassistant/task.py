"""Home Assistant's block format as a task: a sentence, then a ```homeassistant block of JSON service calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chattune.domains.homeassistant.grammar import house_from_messages, house_grammar
from chattune.domains.homeassistant.reply_format import ParsedReply, parse_reply
from chattune.domains.homeassistant.scoring import ExampleScore, devices_in_prompt, score_example, summarize
from chattune.domains.task import LATENCY, PERPLEXITY, Metric, Score, Task

if TYPE_CHECKING:
    from chattune.evaluation.inputs import Example


class HomeAssistantTask(Task):
    name = "homeassistant"
    metrics = (
        Metric("service_call_exact_match", "exact"),
        Metric("call_precision", "prec"),
        Metric("call_recall", "recall"),
        Metric("entity_accuracy", "entity"),
        Metric("json_valid_rate", "json_ok"),
        Metric("no_call_accuracy", "no_call"),
        PERPLEXITY,
        Metric("bleu", "bleu"),
        Metric("rouge1", "rouge1"),
        Metric("rouge2", "rouge2"),
        Metric("rougeL", "rougeL"),
        Metric("meteor", "meteor"),
        Metric("edit_distance", "edit", higher_is_better=False),
        *LATENCY,
        Metric("n_examples", "n"),
    )
    slices = (("language", "by_language"), ("kind", "by_kind"), ("devices", "by_devices"))

    @classmethod
    def detect(cls, examples: Sequence[Example]) -> bool:
        # Single-turn chat rows with a text reference: the block format is what chattune's generator writes.
        return all(example.reference_message is None for example in examples)

    def parse(self, reply: str) -> ParsedReply:
        return parse_reply(reply)

    def score(self, example: Example, reply: str) -> ExampleScore:
        return score_example(example.reference, reply)

    def summarize(self, examples: Sequence[Example], scores: Sequence[Score]) -> dict[str, Any]:
        languages, kinds = [e.language for e in examples], [e.kind for e in examples]
        summary = summarize(scores, languages, kinds, [devices_in_prompt(e.prompt) for e in examples])
        return {"task": self.name, **summary}

    def failure_record(self, row: int, example: Example, reply: str, score: Score) -> dict[str, Any]:
        assert isinstance(score, ExampleScore)
        record = super().failure_record(row, example, reply, score)
        return {
            **record,
            "expected_calls": score.expected_calls,
            "got_calls": score.predicted_calls,
            "json_valid": score.json_valid,
        }

    def grammar(self, example: Example) -> str | None:
        """The reply grammar of the house the prompt lists; None for a prompt without a Devices line."""
        house = house_from_messages(example.prompt)
        return None if house is None else house_grammar(house)
