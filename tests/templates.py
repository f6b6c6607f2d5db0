"""Chat templates in the style of common model families, written for the tests.

Each entry: the Jinja template, the end-of-turn text that closes an assistant message, and whether the
template accepts a system message.
"""

from chattune.models.chatml import CHATML_TEMPLATE

LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA = (
    "<bos>{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)

INLINE_TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, "<|im_end|>", True),
    "llama3": (LLAMA3, "<|eot_id|>", True),
    "zephyr": (ZEPHYR, "</s>", True),
    "phi3": (PHI3, "<|end|>", True),
    "gemma": (GEMMA, "<end_of_turn>", False),
    "mistral": (MISTRAL, "</s>", True),
}
# The shared real tokenizers: end-of-turn text and system support.
SHARED_TEMPLATES = {
    "qwen2-instruct": ("<|im_end|>", True),
    "mistral-v1-instruct": ("</s>", True),
}
