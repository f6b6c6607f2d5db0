"""Generate replies for test examples and score them: the one path evaluate.py and train.py's `--eval_generate`
share, so a metric logged during training means what evaluate.py reports for the same model and examples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chattune.data.masking import IGNORE_INDEX, ChatMasker
from chattune.domains.homeassistant.scoring import ExampleScore, devices_in_prompt, score_example, summarize
from chattune.evaluation import tool_calls
from chattune.evaluation.generation import (
    auto_max_new_tokens,
    generate_replies,
    reference_continuations,
    reference_nll,
    reference_token_ids,
    render_prompt_texts,
)
from chattune.evaluation.inputs import Example, is_tool_calling
from chattune.evaluation.llama_cpp import LlamaCppModel


@dataclass
class ScoredReplies:
    replies: list[str]
    scores: list[ExampleScore] | list[tool_calls.TurnScore]
    max_new_tokens: int


def generate_and_score(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int,
    device: str,
    max_new_tokens: int | None = None,
    reference_likelihood: bool = True,
    progress: bool = True,
    tool_call_format: str = "auto",
) -> ScoredReplies:
    """Greedy replies scored against their references, in the order of `examples`.

    With `reference_likelihood` each score also holds its reference's NLL (for perplexity); without it only
    the replies are generated. `max_new_tokens` None sizes the reply budget from the references; `progress`
    shows a progress bar on stderr. Tool-calling examples are scored turn by turn, their calls read from the
    replies with `tool_call_format` (chattune.evaluation.tool_calls). Each score holds its batch's wall time.
    """
    texts = render_prompt_texts(tokenizer, examples)
    # The template already wrote any BOS; letting the tokenizer add another would shift the model.
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    continuations = reference_continuations(ChatMasker(tokenizer), examples, prompts) if reference_likelihood else None
    max_new_tokens = max_new_tokens or auto_max_new_tokens(tokenizer, examples)
    seconds: list[float | None] = []
    if isinstance(model, LlamaCppModel):  # a GGUF file in llama.cpp
        replies, nlls = model.generate_replies(texts, prompts, max_new_tokens, continuations, seconds, progress)
    else:
        replies, nlls = generate_replies(
            model, tokenizer, prompts, batch_size, max_new_tokens, device, continuations, seconds, progress
        )
    if continuations is not None:
        apart = [i for i, continuation in enumerate(continuations) if continuation is None]
        if apart:  # references the prompt is not a prefix of: one teacher-forced pass of their own
            separate = _separate_nll(model, tokenizer, [examples[i] for i in apart], batch_size, device)
            for index, result in zip(apart, separate):
                nlls[index] = result
    if is_tool_calling(examples):
        parse = tool_calls.parser_for(tool_call_format)
        scores: list = [
            tool_calls.score_turn(e.reference_message, reply, parse, e.after_tool_result)
            for e, reply in zip(examples, replies)
        ]
    else:
        scores = [score_example(e.reference, reply) for e, reply in zip(examples, replies)]
    for score, nll, took in zip(scores, nlls, seconds):
        score.seconds = took
        if nll is not None:
            score.nll_sum, score.n_tokens = nll
    return ScoredReplies(replies, scores, max_new_tokens)


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


def summarize_examples(examples: Sequence[Example], scores: Sequence[Any]) -> dict[str, Any]:
    """The scorer's summary of these examples: overall, per language and per kind (and, for Home Assistant
    replies, per number of devices in the prompt)."""
    languages, kinds = [e.language for e in examples], [e.kind for e in examples]
    if is_tool_calling(list(examples)):
        return tool_calls.summarize(scores, languages, kinds)
    return summarize(scores, languages, kinds, [devices_in_prompt(e.prompt) for e in examples])
