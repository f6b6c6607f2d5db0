"""A task defined outside chattune, as a user would write one: the reply must repeat the reference's first word.

It proves the task seam: train.py (`--eval_task tests/echo_task.py:FirstWordTask`) and evaluate.py (`--task ...`)
score with it without chattune knowing it exists (tests/test_tasks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chattune.domains.task import Metric, Score, Task


@dataclass
class FirstWordScore(Score):
    said: str  # the reply's first word
    words: int  # words in the reply


class FirstWordTask(Task):
    name = "first_word"
    metrics = (Metric("first_word_accuracy", "first"), Metric("reply_words", "words", higher_is_better=False))

    def parse(self, reply: str) -> str:
        return reply.split()[0].strip(".,!").lower() if reply.split() else ""

    def score(self, example: Any, reply: str) -> FirstWordScore:
        said = self.parse(reply)
        return FirstWordScore(exact_match=said == self.parse(example.reference), said=said, words=len(reply.split()))

    def summarize(self, examples: Sequence[Any], scores: Sequence[Score]) -> dict[str, Any]:
        def metrics(group: Sequence[Any]) -> dict[str, Any]:
            count = len(group)
            return {
                "first_word_accuracy": sum(s.exact_match for s in group) / count if count else None,
                "reply_words": sum(s.words for s in group) / count if count else None,
            }

        by_kind: dict[str, list] = {}
        for example, score in zip(examples, scores):
            by_kind.setdefault(example.kind, []).append(score)
        return {"task": self.name, **metrics(scores), "by_kind": {k: metrics(v) for k, v in sorted(by_kind.items())}}
