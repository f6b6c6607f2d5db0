"""ChatML, the one spelling of it: the tokens, the Jinja template train.py gives a tokenizer without one
(`--add_chatml_tokens`), and that template rendered without a tokenizer (the data generator's raw corpus).

    <|im_start|>role
    content<|im_end|>

Rendering goes through the template itself, so the generator's text and train.py's cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# Plain ChatML: each message opens with its role and closes with <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def _compiled() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML_TEMPLATE)


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """`messages` as CHATML_TEMPLATE renders them (the same text as a tokenizer's apply_chat_template with it)."""
    return _compiled().render(messages=list(messages), add_generation_prompt=add_generation_prompt)
