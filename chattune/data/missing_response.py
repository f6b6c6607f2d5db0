"""Why an example was skipped with no assistant response: the tokens where the response should start.

home-llm printed every such example's token ids so the user could pick --prefix_ids/--suffix_ids by eye. Here
the first skipped example is shown once, in the window that matters: the tokens around where the template opens
the assistant's reply, next to the template's own response header and end-of-turn token, in context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chattune.data.formats import Conversation
from chattune.data.masking import ChatMasker, MaskingError

# Tokens shown before and after the point where the response should start: the header sits just before it.
TOKENS_BEFORE, TOKENS_AFTER = 10, 6


def explain_missing_response(
    row: Conversation | str, tokenizer: Any, masker: ChatMasker | None, prefix_ids: Sequence[int] | None
) -> str:
    """One line: why `row` has no trained response, the template's markers, and the tokens around the start."""
    if isinstance(row, str):  # a text row: only --prefix_ids can open a response in it
        ids = tokenizer(row, add_special_tokens=True)["input_ids"]
        return f"--prefix_ids {_ids(prefix_ids)} do not occur in its {len(ids)} tokens; its first tokens: " + (
            token_window(tokenizer, ids, 0)
        )
    text = masker.render(row.messages, row.tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    start = _token_at(offsets, _response_start(masker, row, text))
    return (
        f"{_reason(row, prefix_ids, len(ids))}; {template_markers(masker, tokenizer)}; "
        f"tokens around where the response should start (|> marks it): {token_window(tokenizer, ids, start)}"
    )


def _reason(row: Conversation, prefix_ids: Sequence[int] | None, n_tokens: int) -> str:
    roles = [message["role"] for message in row.messages]
    if "assistant" not in roles:
        return f"it has no assistant message (roles: {', '.join(dict.fromkeys(roles))})"
    if prefix_ids:
        return f"--prefix_ids {_ids(prefix_ids)} do not occur in its {n_tokens} tokens"
    if not any(row.trained_replies):
        return 'every assistant reply has "weight": 0'
    return "the chat template leaves no assistant tokens to train"


def template_markers(masker: ChatMasker, tokenizer: Any) -> str:
    """The template's response header and end-of-turn token, as text and as ids (what --prefix_ids and
    --suffix_ids would be if the tokenizer splits them the same way in context)."""
    header = masker.generation_prompt()
    markers = f"the template opens a response with {header!r} = {_ids(_encode(tokenizer, header))}"
    try:
        end = masker.end_of_turn_token()
    except MaskingError:  # a template that cannot render the probe conversation: the header alone still helps
        end = None
    if end:
        markers += f" and closes it with {end!r} = {_ids(_encode(tokenizer, end))}"
    return markers


def _response_start(masker: ChatMasker, row: Conversation, text: str) -> int:
    """The character where the first assistant reply begins, or the end of the text when there is none."""
    try:
        _, spans = masker.assistant_spans(row.messages, row.tools)
    except MaskingError:
        spans = []
    return spans[0].content_start if spans else len(text)


def _token_at(offsets: Sequence[Sequence[int]], char: int) -> int:
    """The index of the first token that ends after `char` (len(offsets) when none does)."""
    return next((index for index, (_, end) in enumerate(offsets) if end > char), len(offsets))


def token_window(tokenizer: Any, ids: Sequence[int], start: int) -> str:
    """`id 'piece'` for the tokens around `start`, with `|>` before the token at `start`."""
    low, high = max(0, start - TOKENS_BEFORE), min(len(ids), start + TOKENS_AFTER)
    shown = [
        ("|> " if index == start else "") + f"{ids[index]} {tokenizer.decode([ids[index]])!r}"
        for index in range(low, high)
    ]
    if start == len(ids):
        shown.append("|> (end)")
    return ("... " if low else "") + ", ".join(shown) + (" ..." if high < len(ids) else "")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _ids(ids: Sequence[int] | None) -> str:
    return ",".join(str(i) for i in ids or [])
