"""Generate replies for test examples and score them: the one path evaluate.py and train.py's `--eval_generate`
share, so a metric logged during training means what evaluate.py reports for the same model and examples.

What a reply means and how it is scored is the task's (chattune.domains.task); nothing here knows a domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chattune.data.masking import IGNORE_INDEX, ChatMasker
from chattune.domains.task import Score, Task
from chattune.evaluation.generation import (
    auto_max_new_tokens,
    generate_replies,
    reference_continuations,
    reference_nll,
    reference_token_ids,
    render_prompt_texts,
)
from chattune.evaluation.inputs import Example
from chattune.evaluation.llama_cpp import LlamaCppModel


@dataclass
class ScoredReplies:
    replies: list[str]
    scores: list[Score]
    max_new_tokens: int
    unconstrained_rows: list[int] | None = None  # with constrain: 1-based rows the task had no grammar for


def generate_and_score(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task: Task,
    batch_size: int,
    device: str,
    max_new_tokens: int | None = None,
    reference_likelihood: bool = True,
    progress: bool = True,
    constrain: bool = False,
) -> ScoredReplies:
    """Greedy replies scored by `task` against their references, in the order of `examples`.

    With `reference_likelihood` each score also holds its reference's NLL (for perplexity); without it only
    the replies are generated. `max_new_tokens` None sizes the reply budget from the references; `progress`
    shows a progress bar on stderr. With `constrain`, each reply follows the grammar the task gives for its prompt;
    a prompt without one is generated free and listed in `unconstrained_rows`. Each score holds its batch's wall
    time.
    """
    texts = render_prompt_texts(tokenizer, examples)
    # The template already wrote any BOS; letting the tokenizer add another would shift the model.
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    continuations = reference_continuations(ChatMasker(tokenizer), examples, prompts) if reference_likelihood else None
    max_new_tokens = max_new_tokens or auto_max_new_tokens(tokenizer, examples)
    grammars = [task.grammar(example) for example in examples] if constrain else None
    seconds: list[float | None] = []
    if isinstance(model, LlamaCppModel):  # a GGUF file in llama.cpp
        replies, nlls = model.generate_replies(
            texts, prompts, max_new_tokens, continuations, seconds, progress, grammars
        )
    else:
        replies, nlls = generate_replies(
            model, tokenizer, prompts, batch_size, max_new_tokens, device, continuations, seconds, progress, grammars
        )
    if continuations is not None:
        apart = [i for i, continuation in enumerate(continuations) if continuation is None]
        if apart:  # references the prompt is not a prefix of: one teacher-forced pass of their own
            separate = _separate_nll(model, tokenizer, [examples[i] for i in apart], batch_size, device)
            for index, result in zip(apart, separate):
                nlls[index] = result
    scores = [task.score(example, reply) for example, reply in zip(examples, replies)]
    for score, nll, took in zip(scores, nlls, seconds):
        score.seconds = took
        if nll is not None:
            score.nll_sum, score.n_tokens = nll
    free = [index + 1 for index, grammar in enumerate(grammars) if grammar is None] if grammars is not None else None
    return ScoredReplies(replies, scores, max_new_tokens, free)


def _separate_nll(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, device: str
) -> list[tuple[float, int] | None]:
    if not isinstance(model, LlamaCppModel):
        return reference_nll(model, tokenizer, examples, batch_size, device)
    masker, results = ChatMasker(tokenizer), []
    for example in examples:
        encoded = reference_token_ids(masker, example)
        first = next((i for i, label in enumerate(encoded[1]) if label != IGNORE_INDEX), None) if encoded else None
        if not first:  # unmaskable, or nothing before the reference to condition on
            results.append(None)
            continue
        ids, labels = encoded
        results.append(model.reference_nll(ids[:first], (ids[first:], labels[first:])))
    return results


def summarize_examples(task: Task, examples: Sequence[Example], scores: Sequence[Score]) -> dict[str, Any]:
    """The task's summary of these examples: overall and per slice (language, kind, and the task's own)."""
    return task.summarize(examples, scores)
