"""Tool calling as a task: each assistant turn is scored on the calls it makes, for any tool schema."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chattune.domains.task import LATENCY, PERPLEXITY, Metric, Score, Task
from chattune.domains.tool_calling.grammar import CALL_CLOSE, CALL_OPEN, tools_grammar
from chattune.domains.tool_calling.scoring import (
    TASK,
    ParsedCalls,
    TurnScore,
    parser_for,
    reference_calls,
    score_turn,
    summarize,
)

if TYPE_CHECKING:
    from chattune.evaluation.inputs import Example


class ToolCallingTask(Task):
    name = TASK
    metrics = (
        Metric("tool_call_exact_match", "exact"),
        Metric("function_name_accuracy", "func"),
        Metric("argument_accuracy", "args"),
        Metric("json_valid_rate", "json_ok"),
        Metric("no_call_accuracy", "no_call"),
        Metric("final_reply_rougeL", "final_rL"),
        PERPLEXITY,
        *LATENCY,
        Metric("n_turns", "turns"),
    )
    reads_tool_call_format = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.tool_call_format = options.get("tool_call_format") or "auto"
        self._parse = parser_for(self.tool_call_format)

    @classmethod
    def detect(cls, examples: Sequence[Example]) -> bool:
        # The loader keeps the whole reference turn (its calls) only for OpenAI-style tool rows.
        return any(example.reference_message is not None for example in examples)

    def parse(self, reply: str) -> ParsedCalls:
        return self._parse(reply)

    def score(self, example: Example, reply: str) -> TurnScore:
        reference = example.reference_message or {"role": "assistant", "content": example.reference}
        return score_turn(reference, reply, self._parse, example.after_tool_result)

    def summarize(self, examples: Sequence[Example], scores: Sequence[Score]) -> dict[str, Any]:
        return summarize(scores, [e.language for e in examples], [e.kind for e in examples])

    def failure_record(self, row: int, example: Example, reply: str, score: Score) -> dict[str, Any]:
        assert isinstance(score, TurnScore)
        record = super().failure_record(row, example, reply, score)
        return {**record, "expected_calls": score.expected_calls, "got_calls": score.predicted_calls}

    def reference_reply(self, example: Example) -> str:
        """The reference turn in the Hermes syntax, which every parser but a custom regex reads."""
        message = example.reference_message or {}
        calls = [vars(call) for call in reference_calls(message)]
        text = str(message.get("content") or "")
        return "\n".join([text, *(f"{CALL_OPEN}{json.dumps(call, ensure_ascii=False)}{CALL_CLOSE}" for call in calls)])

    def grammar(self, example: Example) -> str | None:
        """Calls in the Hermes syntax to the row's own tools; None for another --tool_call_format or no tools."""
        if self.tool_call_format not in ("auto", "hermes") or not example.tools:
            return None
        return tools_grammar(example.tools)
