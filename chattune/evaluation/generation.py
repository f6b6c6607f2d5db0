"""Running the model over the test prompts: batched greedy replies, and the likelihood of each reference reply.

The reference NLL comes from the same forward pass that starts generation where the template allows it
(`generate_replies` with continuations), else from a separate teacher-forced pass (`reference_nll`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from chattune.data.masking import IGNORE_INDEX, ChatMasker, MaskingError, labels_from_spans
from chattune.evaluation.inputs import EvalError, Example

logger = logging.getLogger("chattune.evaluate")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """generation_config's eos ids, plus the template's end-of-turn token.

    train.py already puts the end-of-turn token in generation_config, but an adapter's base model or a
    stock checkpoint may not have it, and a reply that runs past its turn would score as garbage.
    """
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, list | tuple) else [configured]
    ids.append(tokenizer.eos_token_id)
    with contextlib.suppress(Exception):  # an unusual template only loses the extra stop token
        end_of_turn = ChatMasker(tokenizer).end_of_turn_token()
        if end_of_turn is not None:
            ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def render_prompts(tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    # The template already wrote any BOS; letting the tokenizer add another would shift the model.
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in render_prompt_texts(tokenizer, examples)]


def render_prompt_texts(tokenizer: Any, examples: Sequence[Example]) -> list[str]:
    """Each example's prompt rendered by the chat template, ending with the assistant turn's opening."""
    from jinja2 import TemplateError

    texts = []
    for index, example in enumerate(examples):
        try:
            texts.append(
                tokenizer.apply_chat_template(
                    example.prompt, tools=example.tools, tokenize=False, add_generation_prompt=True
                )
            )
        except TemplateError as error:  # e.g. a template that forbids system messages
            raise EvalError(f"row {index + 1}: the model's chat template rejects this prompt: {error}") from None
    return texts


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


# A prompt head shared by a whole batch (a house's system prompt) is run once when it is at least this long:
# below it, one more forward call costs more than the rows it saves.
MIN_SHARED_PREFIX = 32


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one token of its own (generation
    feeds the last prompt token itself)."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    for position in range(shortest - 1):
        if any(s[position] != first[position] for s in sequences):
            return position
    return max(shortest - 1, 0)


def pad_after_prefix(sequences: Sequence[Sequence[int]], prefix: int, pad_id: int, device: str) -> tuple[Any, Any]:
    """[shared prefix | left padding | each row's own tail]: the rows share their first `prefix` positions, so
    their cache can be computed once. Masked padding in the middle is skipped by the position ids (a cumulative
    sum of the mask), so every row sees the positions it would alone. With prefix 0 this is plain left padding."""
    import torch

    tails, mask_tails = left_pad([s[prefix:] for s in sequences], pad_id, device)
    head = torch.tensor([list(sequences[0][:prefix])] * len(sequences), dtype=torch.long, device=device)
    head = head.reshape(len(sequences), prefix)
    return torch.cat([head, tails], dim=1), torch.cat([torch.ones_like(head), mask_tails], dim=1)


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    batch_size: int,
    max_new_tokens: int,
    device: str,
    continuations: Sequence[tuple[list[int], list[int]] | None] | None = None,
    seconds: list[float | None] | None = None,
    progress: bool = True,
    grammars: Sequence[str | None] | None = None,
) -> tuple[list[str], list[tuple[float, int] | None]]:
    """Greedy replies in the order of `prompts`, and the reference NLL of each example with a continuation.

    `grammars`, when given, holds a GBNF grammar per prompt (None: that prompt is free) that its reply must follow
    (chattune.evaluation.constrained).

    `seconds`, when given, is filled (in the order of `prompts`) with the wall time of each example's batch,
    from its first forward pass until its decoded replies: what a request waited for its reply in that batch.

    A continuation is the reference turn's ids after the prompt, with its labels. Each batch runs one forward
    pass over prompt + reference: the reference logits give its NLL, and the key/value cache of the prompt
    part, cut back to the prompt, is where generation starts. Scoring the references then costs the few
    reference tokens instead of a second pass over every prompt.

    Rows of a batch that open with the same tokens (every request to one house shares its system prompt) have
    that head computed once, for one row, and its cache copied to the others (`prefill`).
    """
    import torch
    from tqdm import tqdm

    stops = stop_token_ids(model, tokenizer)
    config = greedy_config(model, tokenizer, stops, max_new_tokens)
    replies: list[str] = [""] * len(prompts)
    nlls: list[tuple[float, int] | None] = [None] * len(prompts)
    batches = list(length_sorted_batches([len(p) for p in prompts], batch_size))
    if seconds is not None:
        seconds[:] = [None] * len(prompts)
    compiler = _grammar_compiler(model, tokenizer, stops) if grammars and any(grammars) else None
    for batch in tqdm(batches, desc="generating", unit="batch", file=sys.stderr, disable=not progress):
        started = time.perf_counter()
        rows = [prompts[i] for i in batch]
        prefix = shared_prefix_length(rows) if len(rows) > 1 else 0
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
        ids, mask = pad_after_prefix(rows, prefix, tokenizer.pad_token_id, device)
        extra: dict[str, Any] = {}
        with torch.inference_mode():
            wanted = [continuations[i] if continuations else None for i in batch]
            if prefix or any(c is not None for c in wanted):
                sums, cache = prefill(model, ids, mask, wanted, tokenizer.pad_token_id, prefix)
                extra[cache_argument(model)] = cache
                for index, result in zip(batch, sums):
                    nlls[index] = result
            if compiler is not None:
                extra["logits_processor"] = _grammar_processors(compiler, [grammars[i] for i in batch])
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
        for row, index in enumerate(batch):
            replies[index] = decode_reply(tokenizer, output[row, ids.shape[1] :].tolist(), stops)
        if seconds is not None:  # .tolist() above waited for the device, so the time is the batch's own
            elapsed = time.perf_counter() - started
            for index in batch:
                seconds[index] = elapsed
    return replies, nlls


def _grammar_compiler(model: Any, tokenizer: Any, stops: list[int]) -> Any:
    from chattune.evaluation.constrained import GrammarCompiler

    width = model.get_output_embeddings().weight.shape[0]  # the logits' width, maybe past the tokenizer's
    return GrammarCompiler(tokenizer, width, stops)


def _grammar_processors(compiler: Any, grammars: Sequence[str | None]) -> Any:
    from transformers import LogitsProcessorList

    from chattune.evaluation.constrained import GrammarLogitsProcessor

    matchers = [compiler.matcher(g) if g else None for g in grammars]
    return LogitsProcessorList([GrammarLogitsProcessor(matchers, compiler.stop_ids)])


def prefill(
    model: Any,
    ids: Any,
    mask: Any,
    continuations: Sequence[tuple[list[int], list[int]] | None],
    pad_id: int,
    prefix: int = 0,
) -> tuple[list[tuple[float, int] | None], Any]:
    """The prompts' key/value cache, up to the last prompt token (which generate() feeds itself), and each
    reference's NLL where a continuation is given.

    The first `prefix` positions, the same in every row, are computed once and the cache copied to every row.
    The rest runs as one pass over [prompt tail | reference | right padding], the reference logits giving its
    NLL; the cache is then cut back to the prompt.
    """
    import torch

    rows, width = ids.shape
    cache = None
    if prefix:
        head = model(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_repeat_interleave(rows)
    longest = max((len(c[0]) for c in continuations if c is not None), default=0)
    if not longest and prefix == width - 1:  # nothing between the shared head and the last prompt token
        return [None] * rows, cache
    full_ids = torch.full((rows, width + longest), pad_id, dtype=ids.dtype, device=ids.device)
    full_mask = torch.zeros_like(full_ids)
    labels = torch.full_like(full_ids, IGNORE_INDEX)
    full_ids[:, :width], full_mask[:, :width] = ids, mask
    for row, continuation in enumerate(continuations):
        if continuation is not None:
            tokens, targets = continuation
            end = width + len(tokens)
            full_ids[row, width:end] = torch.tensor(tokens, device=ids.device)
            full_mask[row, width:end] = 1
            labels[row, width:end] = torch.tensor(targets, device=ids.device)
    end = width + longest if longest else width - 1  # without references, stop before the last prompt token
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {cache_argument(model): cache} if cache is not None else {}
    # logits for the last prompt position (predicting the first reference token) and every reference position
    output = model(
        input_ids=full_ids[:, prefix:end],
        attention_mask=full_mask[:, :end],
        position_ids=positions[:, prefix:end],
        use_cache=True,
        logits_to_keep=longest + 1 if longest else 1,
        **extra,
    )
    sums: list[tuple[float, int] | None] = [None] * rows
    if longest:
        summed = summed_nll(output.logits[:, :-1], labels[:, width:])
        sums = [result if continuations[row] is not None else None for row, result in enumerate(summed)]
    cache = output.past_key_values
    # generate() feeds the last prompt token itself, so its cache must hold everything before it. A negative
    # crop removes that many positions in every transformers 5 release.
    if cache.get_seq_length() > width - 1:
        cache.crop(-(cache.get_seq_length() - (width - 1)))
    return sums, cache


def cache_argument(model: Any) -> str:
    """The name forward() takes a key/value cache under: `cache` in recent transformers, else the older one."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def reference_continuations(
    masker: ChatMasker, examples: Sequence[Example], prompts: Sequence[list[int]]
) -> list[tuple[list[int], list[int]] | None]:
    """Per example, the reference turn's ids and labels that follow its rendered prompt exactly.

    None where the template renders the conversation so that the prompt is not its prefix (those
    references are scored by a separate teacher-forced pass) or where the reference cannot be masked.
    """
    continuations: list[tuple[list[int], list[int]] | None] = []
    for example, prompt in zip(examples, prompts):
        encoded = reference_token_ids(masker, example)
        usable = (
            encoded is not None
            and encoded[0][: len(prompt)] == prompt
            and all(label == IGNORE_INDEX for label in encoded[1][: len(prompt)])
            and any(label != IGNORE_INDEX for label in encoded[1][len(prompt) :])
        )
        continuations.append((encoded[0][len(prompt) :], encoded[1][len(prompt) :]) if usable else None)
    return continuations


def auto_max_new_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    """A reply budget from the references: a quarter more than the longest one, plus a few tokens.

    A model that does not stop (an untuned base model) then costs what a correct reply would, not 256 steps
    per batch; a reply that long is far off the reference anyway.
    """
    longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    return longest * 5 // 4 + 8


def greedy_config(model: Any, tokenizer: Any, stops: list[int], max_new_tokens: int) -> Any:
    config = copy.deepcopy(model.generation_config)
    # Sampling knobs from the checkpoint would only trigger warnings (or sampling) in greedy decoding.
    config.do_sample = False
    config.num_beams = 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.use_cache = True  # train.py turns the model config's cache off for training; replies need it
    config.eos_token_id = stops
    config.pad_token_id = tokenizer.pad_token_id
    return config


def decode_reply(tokenizer: Any, new_ids: list[int], stops: Sequence[int]) -> str:
    """Text up to the first stop token (padding after it is not part of the reply)."""
    stop_set = set(stops)
    end = next((i for i, token in enumerate(new_ids) if token in stop_set), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


def reference_token_ids(masker: ChatMasker, example: Example) -> tuple[list[int], list[int]] | None:
    """prompt+reference ids, labelled on the reference turn only (earlier assistant turns are context)."""
    turn = example.reference_message or {"role": "assistant", "content": example.reference}
    conversation = [*example.prompt, turn]
    try:
        encoded = masker.encode(conversation, example.tools)
    except MaskingError:
        return None
    if not encoded.spans:
        return None
    last = encoded.spans[-1]
    labels = labels_from_spans(encoded.input_ids, encoded.offsets, [(last.label_start, last.label_end)])
    return encoded.input_ids, labels


def reference_nll(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, device: str
) -> list[tuple[float, int] | None]:
    """Teacher-forced summed NLL and token count of each reference answer (None if it cannot be masked)."""
    import torch
    from tqdm import tqdm

    masker = ChatMasker(tokenizer)
    encoded = [reference_token_ids(masker, example) for example in examples]
    usable = [i for i, e in enumerate(encoded) if e is not None and any(t != IGNORE_INDEX for t in e[1])]
    results: list[tuple[float, int] | None] = [None] * len(examples)
    batches = list(length_sorted_batches([len(encoded[i][0]) for i in usable], batch_size))
    for batch in tqdm(batches, desc="perplexity", unit="batch", file=sys.stderr):
        indices = [usable[i] for i in batch]
        with torch.inference_mode():
            sums = _batch_nll(model, [encoded[i] for i in indices], tokenizer.pad_token_id, device)
        for index, result in zip(indices, sums):
            results[index] = result
    skipped = len(examples) - len(usable)
    if skipped:
        logger.warning("perplexity: %d example(s) skipped, the chat template did not render them verbatim", skipped)
    return results


def _batch_nll(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str) -> list:

    ids, mask = left_pad([p[0] for p in pairs], pad_id, device)
    labels, _ = left_pad([p[1] for p in pairs], IGNORE_INDEX, device)
    # Left padding keeps every answer at the right edge, so only the last `keep` positions need logits:
    # a long system prompt then costs no vocabulary-sized logits.
    answer_length = max(len(p[1]) - next(i for i, t in enumerate(p[1]) if t != IGNORE_INDEX) for p in pairs)
    keep = min(answer_length + 1, ids.shape[1])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return summed_nll(logits[:, :-1], labels[:, -(keep - 1) :])


def summed_nll(logits: Any, targets: Any) -> list[tuple[float, int]]:
    """Per row, the summed NLL of the labelled `targets` under `logits` (fp32) and how many were labelled."""
    import torch

    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counted = targets != IGNORE_INDEX
    return [(float(nll[row][counted[row]].sum()), int(counted[row].sum())) for row in range(targets.shape[0])]
