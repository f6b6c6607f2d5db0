"""Which tokens did the assistant say? Label masks for chat SFT.

Two modes:

* automatic (default): the chat template is rendered twice, once with the real conversation and once with
  every assistant message replaced by a sentinel. The sentinel render splits into the template's fixed
  pieces (headers, system text, user turns); walking those pieces through the real render finds each
  assistant message exactly as the template rendered it (after `| trim` and friends). The label span runs
  from there to the end-of-turn special token that closes it (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...).
  Spans are character offsets; tokens are labelled when their offsets overlap a span, so a role header
  that BPE merged into the first word never hides that word. Two renders and one tokenization per
  conversation: cost is linear in its length.
* explicit (`--prefix_ids/--suffix_ids`, home-llm semantics): labels start after each occurrence of the
  prefix ids and run through the suffix ids.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from chattune.errors import ChattuneError

IGNORE_INDEX = -100

# Private-use code points: no tokenizer template touches them and no real message contains them.
_SENTINEL = "\ue000\ue001"
_PROBE_TOOL = "chattune_probe_tool"


class MaskingError(ChattuneError, ValueError):
    """The template or the ids cannot produce a mask for this conversation."""


class TemplateRejection(MaskingError):
    """The chat template raised on the conversation itself (Gemma's on a system turn, Mistral's on roles out of
    order): the row is wrong for this template, which the run reports rather than skipping the row."""


@dataclass
class TurnSpan:
    """Character offsets of one assistant turn in the rendered conversation."""

    content_start: int
    content_end: int  # end of the message content as rendered
    label_end: int  # end of the end-of-turn token(s) that close the turn

    @property
    def label_start(self) -> int:
        return self.content_start


@dataclass
class Encoded:
    text: str
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    spans: list[TurnSpan] = field(default_factory=list)
    closed: bool = True  # False when some turn has no end-of-turn special token to learn


class ChatMasker:
    """Renders conversations with a tokenizer's chat template and labels the assistant turns."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        if not self.chat_template:
            raise MaskingError("the tokenizer has no chat template")
        specials = _special_token_strings(tokenizer)
        # Longest first so that `<|im_end|>` wins over a prefix of it; ties broken by text, so the pattern
        # (and with it the datasets cache fingerprint) is the same in every process.
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s))))
        self._generated_header = self._header_text_left_to_the_model()

    def render(self, messages: Sequence[dict], tools: list | None = None, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tools=tools, chat_template=self.chat_template, tokenize=False, **kwargs
        )

    def assistant_spans(self, messages: Sequence[dict], tools: list | None = None) -> tuple[str, list[TurnSpan]]:
        """Render `messages` and locate every assistant turn in the text."""
        text = self.render(messages, tools)
        if not any(m.get("role") == "assistant" for m in messages):
            return text, []
        if any(_SENTINEL in str(m.get("content") or "") for m in messages):
            raise MaskingError("a message contains the masking sentinel U+E000 U+E001")
        try:
            pieces, contents = self._pieces(text, messages, tools, keep_tool_calls=True)
        except MaskingError:
            if not any(m.get("tool_calls") for m in messages):
                raise
            # Templates that print a tool-calling turn's content only when it is non-empty (Qwen2's) render
            # the sentinel differently from an empty content. Blanking the whole turn, calls included, leaves
            # the pieces around it as for a plain reply, and the calls' text inside the labelled span.
            pieces, contents = self._pieces(text, messages, tools, keep_tool_calls=False)
        final_eot = self._first_special(pieces[-1])
        spans = []
        for (start, end), opening, closing in zip(contents, pieces[:-1], pieces[1:]):
            if self._generated_header and opening.endswith(self._generated_header):
                start -= len(self._generated_header)
            spans.append(TurnSpan(start, end, end + self._end_of_turn(closing, final_eot)))
        return text, spans

    def _pieces(
        self, text: str, messages: Sequence[dict], tools: list | None, keep_tool_calls: bool
    ) -> tuple[list[str], list[tuple[int, int]]]:
        """The template text around each assistant turn (rendered with a sentinel as every assistant content),
        and where each turn sits in `text`."""
        blanked = [_blank(m, keep_tool_calls) if m.get("role") == "assistant" else m for m in messages]
        try:
            pieces = self.render(blanked, tools).split(_SENTINEL)
        except Exception as error:  # a template that checks call/result pairing rejects the blanked turns
            raise MaskingError(f"the chat template rejects a blanked assistant turn: {error}") from error
        n_assistant = sum(1 for m in messages if m.get("role") == "assistant")
        if len(pieces) != n_assistant + 1:
            raise MaskingError(
                f"the chat template renders {len(pieces) - 1} of {n_assistant} assistant messages verbatim; "
                "it rewrites or drops assistant turns, so use --prefix_ids/--suffix_ids"
            )
        return pieces, _align(text, pieces)

    def tool_call_problem(self) -> str | None:
        """Why this template cannot train tool-calling rows, or None. It must render a conversation with a call,
        its `tool` result and a reply, and write the call: SmolLM2's ChatML drops `tool_calls`, which would train
        on an empty turn; Mistral v1's refuses `tool` messages."""
        # nine alphanumerics: Mistral's tool templates insist on that id shape
        call = {"id": "call00001", "type": "function", "function": {"name": _PROBE_TOOL, "arguments": {}}}
        probe = [
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "{}", "tool_call_id": "call00001", "name": _PROBE_TOOL},
            {"role": "assistant", "content": "pong"},
        ]
        try:
            text = self.render(probe)
        except Exception as error:
            return f"fails on a tool call and its result ({error})"
        return None if _PROBE_TOOL in text else "does not write an assistant turn's tool_calls"

    def tools_problem(self) -> str | None:
        """Why this template cannot show a row's tool list to the model, or None: SmolLM2's ChatML ignores
        `tools`, so a model trained or scored on it never sees the tools it is to call."""
        tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "", "parameters": {}}}
        user = [{"role": "user", "content": "ping"}]
        try:
            offered = self.render(user, [tool])
        except Exception as error:
            return f"fails on a tool list ({error})"
        return None if offered != self.render(user) else "does not write the tools offered"

    def encode(self, messages: Sequence[dict], tools: list | None = None) -> Encoded:
        result = self.encode_many([(messages, tools)])[0]
        if isinstance(result, MaskingError):
            raise result
        return result

    def encode_many(
        self,
        conversations: Sequence[tuple[Sequence[dict], list | None]],
        trained: Sequence[Sequence[bool] | None] | None = None,
    ) -> list[Encoded | MaskingError]:
        """Encode (messages, tools) pairs with one tokenizer call; a conversation that fails gets its error.

        `trained`, per conversation, says which assistant replies are labelled (all of them when None).
        """
        trained = trained or [None] * len(conversations)
        rendered: list[tuple[str, list[TurnSpan], Sequence[bool] | None] | MaskingError] = []
        for (messages, tools), replies in zip(conversations, trained):
            try:
                rendered.append((*self.assistant_spans(messages, tools), replies))
            except MaskingError as error:
                rendered.append(error)
            except TemplateError as error:
                rendered.append(TemplateRejection(str(error)))
        texts = [item[0] for item in rendered if not isinstance(item, MaskingError)]
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
        encodings = zip(batch.get("input_ids", []), batch.get("offset_mapping", []))
        results: list[Encoded | MaskingError] = []
        for item in rendered:
            if isinstance(item, MaskingError):
                results.append(item)
                continue
            text, spans, replies = item
            ids, offsets = next(encodings)
            offsets = [tuple(offset) for offset in offsets]
            kept = [s for s, keep in zip(spans, replies or [True] * len(spans)) if keep]
            labels = labels_from_spans(ids, offsets, [(s.label_start, s.label_end) for s in kept])
            closed = all(s.label_end > s.content_end for s in spans)
            results.append(Encoded(text, ids, labels, offsets, spans, closed))
        return results

    def _header_text_left_to_the_model(self) -> str:
        """Template text before an assistant message that the generation prompt does not supply.

        Mistral-style templates render `[/INST] answer`: the generation prompt stops at `[/INST]`, so at
        inference the model itself writes the space before the answer, and it must be labelled. ChatML's
        history header equals its generation prompt, so nothing is left. Found once per template.
        """
        user = [{"role": "user", "content": "ping"}]
        try:
            bare = self.render(user)
            prompt = self.render(user, add_generation_prompt=True)
            opening = self.render([*user, {"role": "assistant", "content": _SENTINEL}]).split(_SENTINEL)[0]
        except Exception:  # templates that need more context: assume nothing is left to the model
            return ""
        if not (prompt.startswith(bare) and opening.startswith(prompt)):
            return ""
        return opening[len(prompt) :]

    def generation_prompt(self) -> str:
        """The text `add_generation_prompt=True` appends: the header that opens an assistant response."""
        user = [{"role": "user", "content": "ping"}]
        return self.render(user, add_generation_prompt=True)[len(self.render(user)) :]

    def end_of_turn_token(self) -> str | None:
        """The special token that closes an assistant turn in this template (None if there is none)."""
        sample = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        _, (span,) = self.assistant_spans(sample)
        return self._first_special(self.render(sample)[span.content_end : span.label_end])

    def _first_special(self, text: str) -> str | None:
        match = self._special_re.search(text) if self._special_re.pattern else None
        return match.group(0) if match else None

    def _end_of_turn(self, closing: str, final_eot: str | None) -> int:
        """Length of the closing text that the assistant must generate: up to its end-of-turn token.

        The token that closes the last turn (nothing follows it) is the template's end-of-turn marker;
        earlier turns are closed by the same token, or failing that by the first special token.
        """
        if final_eot is not None:
            index = closing.find(final_eot)
            if index >= 0:
                return index + len(final_eot)
        match = self._special_re.search(closing) if self._special_re.pattern else None
        return match.end() if match else 0


def _blank(message: dict, keep_tool_calls: bool) -> dict:
    blanked = {**message, "content": _SENTINEL}
    if not keep_tool_calls:
        blanked.pop("tool_calls", None)
    return blanked


def _align(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Where each assistant message sits in `text`, given the fixed pieces that surround them."""
    if not text.startswith(pieces[0]):
        raise MaskingError("the chat template renders differently when assistant contents change")
    spans, pos = [], len(pieces[0])
    for index, piece in enumerate(pieces[1:], start=1):
        if index == len(pieces) - 1:
            end = len(text) - len(piece)
            if end < pos or not text.endswith(piece):
                end = -1
        else:
            end = text.find(piece, pos)
        if end < 0:
            raise MaskingError("the chat template renders differently when assistant contents change")
        spans.append((pos, end))
        pos = end + len(piece)
    return spans


def labels_from_spans(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Label each token whose characters overlap a span (or, zero-width, sit inside one).

    Offsets come in text order, so each span's tokens are found by bisection and only they are visited:
    the prompt, usually most of the tokens, is never walked.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    ends = [end for _, end in offsets]
    for span_start, span_end in spans:
        index = bisect.bisect_left(ends, span_start)  # the first token that ends at or after the span's start
        while index < len(offsets) and offsets[index][0] < span_end:
            start, end = offsets[index]
            if end > span_start or (start == end and start >= span_start):
                labels[index] = input_ids[index]
            index += 1
    return labels


def find_sublist(haystack: Sequence[int], needle: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `needle` in `haystack` at or after `start`, else -1."""
    if not needle:
        return -1
    first, n = needle[0], len(needle)
    for i in range(start, len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def explicit_spans(input_ids: Sequence[int], prefix: Sequence[int], suffix: Sequence[int] | None) -> list[range]:
    """home-llm semantics: from after each prefix through the next suffix (or the end), as token ranges."""
    spans = []
    pos = 0
    while (found := find_sublist(input_ids, prefix, pos)) >= 0:
        start = found + len(prefix)
        stop = find_sublist(input_ids, suffix, start) if suffix else -1
        end = stop + len(suffix) if stop >= 0 else len(input_ids)
        spans.append(range(start, end))
        pos = max(end, start)
    return spans


def explicit_labels(
    input_ids: Sequence[int],
    prefix: Sequence[int],
    suffix: Sequence[int] | None,
    replies: Sequence[bool] | None = None,
) -> list[int]:
    """Labels of the explicit spans; `replies` (one flag per assistant reply) leaves the unflagged ones out, and
    then needs one span per reply (a MaskingError otherwise)."""
    spans = explicit_spans(input_ids, prefix, suffix)
    if replies is not None and not all(replies):
        if len(spans) != len(replies):
            raise MaskingError(
                f"--prefix_ids open {len(spans)} span(s) for {len(replies)} assistant replies, so the replies with "
                "weight 0 cannot be left out"
            )
        spans = [span for span, keep in zip(spans, replies) if keep]
    labels = [IGNORE_INDEX] * len(input_ids)
    for span in spans:
        labels[span.start : span.stop] = input_ids[span.start : span.stop]
    return labels


def trim_suffix_overlap(prefix: Sequence[int], suffix: Sequence[int]) -> list[int]:
    """Drop the tail of `suffix` that opens the next assistant turn.

    Old find_split versions printed suffixes such as `<|eot_id|><|start_header_id|>assistant...`: the
    end-of-turn token followed by the next response header. Labelling that header would train the model
    on template text, so only the part before it is kept.
    """
    suffix = list(suffix)
    for n in range(min(len(prefix), len(suffix)), 0, -1):
        if suffix[-n:] == list(prefix[:n]):
            return suffix[:-n]
    return suffix


def _special_token_strings(tokenizer: Any) -> set[str]:
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) if t}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False) and token.content:
            specials.add(token.content)
    return specials
