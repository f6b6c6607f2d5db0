"""Orchestration: load piles, build every split for every language, write the files, count.

One `random.Random(seed)` hands out a child seed per (language, part) in a fixed order, so a part's
content depends only on the seed, its language's position and the pile files: never on hashing,
dict order of the file system, or which other outputs were requested.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from chattune.atomic import creation_problem
from chattune.domains.homeassistant.datagen.dpo import REJECTIONS, build_pair
from chattune.domains.homeassistant.datagen.errors import DataGenError
from chattune.domains.homeassistant.datagen.examples import KINDS, MERGED_KIND, Example, ExampleBuilder
from chattune.domains.homeassistant.datagen.merge import merged_examples
from chattune.domains.homeassistant.datagen.piles import LanguagePile, discover_languages, load_language
from chattune.domains.homeassistant.datagen.tool_calls import FAILED_CALL_KIND, TOOL_SETS, tool_call_record
from chattune.domains.homeassistant.datagen.writers import FORMATS, count_table, example_record, write_jsonl

# Train examples per language; test is TEST_FRACTION of that, DPO pairs DPO_FRACTION of it.
SIZES: dict[str, int] = {"small": 3000, "medium": 7500, "large": 15000, "xl": 50000}
TEST_FRACTION = 0.07
DPO_FRACTION = 0.5
SAMPLE_PER_KIND = 6
# Implied and paraphrased requests (specific_action) are what a fine-tuned model misses most; they get a
# larger share than before (0.15) at the expense of template actions.
KIND_WEIGHTS: dict[str, float] = {
    "specific_action": 0.2,
    "template_action": 0.3,
    "multi_device_action": 0.15,
    "status": 0.2,
    "refusal": 0.15,
    FAILED_CALL_KIND: 0.1,  # the tool-calling format only
}
# Share of refusals that come with a contrastive twin: the same request, its device listed, carried out
# (counted as a template_action). The rest are plain refusals.
CONTRASTIVE_SHARE = 0.5
DEFAULT_SEED = 42
DEFAULT_MAX_DEVICES = 16
PARTS = ("train", "test", "sample", "dpo")
MAX_DUPLICATE_DRAWS = 50
FILE_NAMES = {
    "train": "home_assistant_train.jsonl",
    "test": "home_assistant_test.jsonl",
    "sample": "home_assistant_sample.jsonl",
    "dpo": "home_assistant_dpo.jsonl",
}


@dataclass
class GenerateConfig:
    """What to generate; mirrors the CLI flags."""

    output_dir: Path
    piles_dir: Path
    languages: list[str] = field(default_factory=lambda: ["english"])
    size: str = "small"
    train: bool = True
    test: bool = True
    sample: bool = False
    dpo: bool = False
    fmt: str = "sharegpt"
    tool_set: str = "intents"  # the tool-calling format's tools: Home Assistant intents or services
    no_system_role: bool = False  # fold the system prompt into the first user turn
    seed: int = DEFAULT_SEED
    merge: Path | None = None
    max_devices: int = DEFAULT_MAX_DEVICES
    compact_prompt: bool = False  # persona sentence + device list only (see prompts.system_prompt)
    per_language_files: bool = False  # also one file per language and part, as home-llm wrote them
    train_count: int | None = None  # overrides the size (per language); tests use it to stay fast
    progress: bool | None = None  # None: show the bar only on a terminal


@dataclass
class GenerateResult:
    files: dict[str, Path]
    counts: dict[str, Counter]
    warnings: list[str]
    table: str


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def generate(config: GenerateConfig, warn: Callable[[str], None] = _stderr_warning) -> GenerateResult:
    """Generate and write the requested files; raises DataGenError on bad input."""
    languages = _check_config(config)
    piles = {language: load_language(config.piles_dir, language) for language in languages}
    warnings = [message for pile in piles.values() for message in pile.warnings]
    for message in warnings:
        warn(message)
    # read before generating, so that a bad merge file stops the run before the work
    merged = merged_examples(config.merge, piles[languages[0]]) if config.merge is not None else None
    master = random.Random(config.seed)
    seeds = {language: {part: master.getrandbits(64) for part in PARTS} for language in languages}
    shuffle_seed = master.getrandbits(64)
    train_count = config.train_count if config.train_count is not None else SIZES[config.size]
    plan = _plan(config, train_count)
    outputs: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, Counter] = {}
    with tqdm(
        total=sum(plan.values()) * len(languages),
        file=sys.stderr,
        disable=_bar_disabled(config),
        desc="generating",
        unit="ex",
    ) as bar:
        for part in plan:
            records, counts[part] = _build_part(part, plan[part], piles, seeds, config, bar)
            outputs[part] = records
    if merged is not None and "train" in outputs:
        outputs["train"] += [_record(example, config) for example in merged]
        counts["train"][(languages[0], MERGED_KIND)] += len(merged)
    files = _write(config, outputs, shuffle_seed)
    table = _tables(counts, languages, config.merge is not None)
    return GenerateResult(files, counts, warnings, table)


def _check_config(config: GenerateConfig) -> list[str]:
    known = discover_languages(config.piles_dir)
    languages = list(dict.fromkeys(config.languages))  # drop repeats, keep the order given
    unknown = [language for language in languages if language not in known]
    if unknown or not languages:
        raise DataGenError(
            f"unknown language {', '.join(map(repr, unknown)) or '(none given)'}; known languages: "
            f"{', '.join(known) or 'none'} (folders under {config.piles_dir})"
        )
    if config.size not in SIZES:
        raise DataGenError(f"unknown size {config.size!r}; known: {', '.join(SIZES)}")
    if config.fmt not in FORMATS:
        raise DataGenError(f"unknown format {config.fmt!r}; known: {', '.join(FORMATS)}")
    if config.tool_set not in TOOL_SETS:
        raise DataGenError(f"unknown tool set {config.tool_set!r}; known: {', '.join(TOOL_SETS)}")
    if config.no_system_role and config.fmt == "raw_corpus":
        raise DataGenError("--no_system_role applies to conversations; the raw corpus is rendered as ChatML")
    if config.dpo and config.fmt == "tool_calls":
        raise DataGenError("--dpo pairs are written in the block format only; drop --dpo or --format tool_calls")
    if config.max_devices < 1:
        raise DataGenError("--max_devices must be at least 1")
    if not (config.train or config.test or config.sample or config.dpo):
        raise DataGenError("nothing to do: pass at least one of --train, --test, --sample, --dpo")
    if config.merge is not None and not config.train:
        raise DataGenError("--merge mixes into the train split: pass --train too")
    problem = creation_problem(config.output_dir)  # before generating: the files would be lost at the end
    if problem:
        raise DataGenError(
            f"--output_dir {config.output_dir}: cannot write the files there ({problem}); pass another --output_dir"
        )
    return languages


def _bar_disabled(config: GenerateConfig) -> bool | None:
    return None if config.progress is None else not config.progress


def _plan(config: GenerateConfig, train_count: int) -> dict[str, int]:
    """How many items each requested part gets per language."""
    plan = {}
    if config.train:
        plan["train"] = train_count
    if config.test:
        plan["test"] = max(1, round(train_count * TEST_FRACTION))
    if config.sample:
        plan["sample"] = SAMPLE_PER_KIND * (len(KINDS) + (config.fmt == "tool_calls"))
    if config.dpo:
        plan["dpo"] = max(len(REJECTIONS), round(train_count * DPO_FRACTION))
    return plan


def kind_quotas(total: int, kinds: list[str]) -> dict[str, int]:
    """Split `total` over `kinds` by KIND_WEIGHTS, exactly (largest remainders, ties in kind order)."""
    weight_sum = sum(KIND_WEIGHTS[kind] for kind in kinds)
    shares = {kind: total * KIND_WEIGHTS[kind] / weight_sum for kind in kinds}
    quotas = {kind: int(share) for kind, share in shares.items()}
    by_remainder = sorted(kinds, key=lambda kind: (-(shares[kind] - quotas[kind]), kinds.index(kind)))
    for kind in by_remainder[: total - sum(quotas.values())]:
        quotas[kind] += 1
    return quotas


def _build_part(
    part: str,
    per_language: int,
    piles: dict[str, LanguagePile],
    seeds: dict[str, dict[str, int]],
    config: GenerateConfig,
    bar: tqdm,
) -> tuple[list[dict[str, Any]], Counter]:
    records: list[dict[str, Any]] = []
    counts: Counter = Counter()
    for language, pile in piles.items():
        rng = random.Random(seeds[language][part])
        split = "test" if part == "test" else "train"
        tool_set = config.tool_set if config.fmt == "tool_calls" else None
        builder = ExampleBuilder(pile, split, rng, config.max_devices, config.compact_prompt, tool_set)
        if part == "dpo":
            items = _dpo_records(builder, per_language, rng, bar)
        else:
            examples = _examples(builder, per_language, part, bar)
            items = [_record(example, config) for example in examples]
        records.extend(items)
        counts.update((item["language"], item["kind"]) for item in items)
    return records, counts


def _record(example: Example, config: GenerateConfig) -> dict[str, Any]:
    if config.fmt == "tool_calls":
        return tool_call_record(example, config.tool_set, config.no_system_role)
    return example_record(example, config.fmt, config.no_system_role)


def _examples(builder: ExampleBuilder, total: int, part: str, bar: tqdm) -> list[Example]:
    kinds = builder.available_kinds()
    if part == "sample":
        quotas = {kind: SAMPLE_PER_KIND for kind in kinds}
    else:
        quotas = kind_quotas(total, kinds)
    pairs = contrastive_pairs(quotas)
    quotas = {**quotas, **{kind: quotas[kind] - pairs for kind in ("template_action", "refusal") if pairs}}
    seen: set[tuple[str, str, str]] = set()
    examples = []
    for kind in kinds:
        for _ in range(quotas[kind]):
            examples.extend(_unique(partial(_single, builder, kind), seen, builder, kind))
            bar.update()
        if kind == "refusal":
            for _ in range(pairs):
                examples.extend(_unique(builder.build_contrastive_pair, seen, builder, "contrastive pair"))
                bar.update(2)
    return examples


def _single(builder: ExampleBuilder, kind: str) -> tuple[Example]:
    return (builder.build(kind),)


def contrastive_pairs(quotas: dict[str, int]) -> int:
    """How many refusals get a contrastive twin; each pair takes one refusal and one template_action."""
    if "template_action" not in quotas or "refusal" not in quotas:
        return 0
    return min(round(quotas["refusal"] * CONTRASTIVE_SHARE), quotas["template_action"])


def _unique(
    build: Callable[[], Sequence[Example]], seen: set[tuple[str, str, str]], builder: ExampleBuilder, what: str
) -> Sequence[Example]:
    """Draw until every example of the draw is new to this part (duplicates would weigh twice in training)."""
    for _ in range(MAX_DUPLICATE_DRAWS):
        examples = build()
        keys = [(example.system, example.user, example.assistant) for example in examples]
        if not seen.intersection(keys) and len(set(keys)) == len(keys):
            seen.update(keys)
            return examples
    raise DataGenError(f"{builder.pile.language}: too many duplicate {what} examples; the piles are too small")


def _dpo_records(builder: ExampleBuilder, total: int, rng: random.Random, bar: tqdm) -> list[dict[str, Any]]:
    records = []
    for index in range(total):
        # Round-robin over rejection types: every type occurs, in equal numbers.
        records.append(build_pair(builder, REJECTIONS[index % len(REJECTIONS)], rng))
        bar.update()
    return records


def _write(config: GenerateConfig, outputs: dict[str, list[dict[str, Any]]], shuffle_seed: int) -> dict[str, Path]:
    files = {}
    for part, records in outputs.items():
        # Shuffle so languages and kinds are interleaved; a fixed per-part seed keeps it reproducible.
        random.Random(f"{shuffle_seed}:{part}").shuffle(records)
        path = config.output_dir / FILE_NAMES[part]
        write_jsonl(path, records)
        files[part] = path
        if config.per_language_files:
            for language in dict.fromkeys(config.languages):
                own = [record for record in records if record["language"] == language]
                files[f"{part}_{language}"] = language_path = per_language_path(path, language)
                write_jsonl(language_path, own)
    return files


def per_language_path(merged: Path, language: str) -> Path:
    """home_assistant_train.jsonl -> home_assistant_train_german.jsonl (home-llm's names)."""
    return merged.with_name(f"{merged.stem}_{language}{merged.suffix}")


def _tables(counts: dict[str, Counter], languages: list[str], merged: bool) -> str:
    tables = []
    for part, counter in counts.items():
        tool_kinds = [FAILED_CALL_KIND] if any(kind == FAILED_CALL_KIND for _, kind in counter) else []
        kinds = [*KINDS, *tool_kinds, *([MERGED_KIND] if merged and part == "train" else [])]
        tables.append(count_table(f"{FILE_NAMES[part]}:", counter, languages, kinds))
    return "\n\n".join(tables)
