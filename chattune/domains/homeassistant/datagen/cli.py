"""Command line for data/generate_home_assistant_data.py and chattune-data."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from chattune.cli import entry_point
from chattune.domains.homeassistant.datagen.piles import PILES_DIR
from chattune.domains.homeassistant.datagen.pipeline import (
    DEFAULT_MAX_DEVICES,
    DEFAULT_SEED,
    SIZES,
    GenerateConfig,
    generate,
)
from chattune.domains.homeassistant.datagen.tool_calls import TOOL_SETS
from chattune.domains.homeassistant.datagen.writers import FORMATS


def build_parser(default_output_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate Home Assistant chat datasets from the phrase piles shipped with chattune.",
        epilog="Houses: a language's piles may add rooms.csv (room,name,alias,split) and room_devices.csv "
        "(domain,type,entity_id,friendly_name with {room}, {alias}, {room_name}), which compose every room's "
        "devices across domains with regular ids (light.den) and irregular ones (light.snug_ceiling); a test "
        "room's devices are test devices. data/README.md documents every pile file.",
    )
    parser.add_argument("--train", action="store_true", help="write home_assistant_train.jsonl")
    parser.add_argument("--test", action="store_true", help="write home_assistant_test.jsonl (held-out piles)")
    parser.add_argument("--sample", action="store_true", help="write home_assistant_sample.jsonl (a few dozen)")
    parser.add_argument("--dpo", action="store_true", help="write home_assistant_dpo.jsonl (preference pairs)")
    sizes = parser.add_mutually_exclusive_group()
    for size in SIZES:
        sizes.add_argument(
            f"--{size}",
            dest="size",
            action="store_const",
            const=size,
            help=f"{SIZES[size]} train examples per language",
        )
    formats = parser.add_mutually_exclusive_group()
    formats.add_argument(
        "--sharegpt",
        dest="fmt",
        action="store_const",
        const="sharegpt",
        help="conversations format (default)",
    )
    formats.add_argument(
        "--raw_corpus", dest="fmt", action="store_const", const="raw_corpus", help="one ChatML text per line"
    )
    formats.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        help="sharegpt (conversations with a ```homeassistant block; default), raw_corpus, or tool_calls "
        "(OpenAI-style messages with tool_calls, tool results and a final reply, plus a tools column)",
    )
    parser.add_argument(
        "--tools",
        dest="tool_set",
        choices=TOOL_SETS,
        default="intents",
        help="with --format tool_calls: Home Assistant's intent tools addressed by device name (default), or one "
        "tool per service addressed by entity_id",
    )
    parser.add_argument(
        "--no_system_role",
        action="store_true",
        help="put the system prompt at the start of the first user turn, for chat templates that reject a system "
        "message (e.g. Gemma's)",
    )
    parser.add_argument(
        "--language",
        nargs="+",
        default=["english"],
        metavar="LANG",
        help="languages (folders of the pile folder), e.g. english german french spanish polish",
    )
    parser.add_argument(
        "--per_language_files",
        action="store_true",
        help="also write one file per language next to each merged one, e.g. home_assistant_train_german.jsonl",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--merge", type=Path, metavar="FILE", help="Alpaca JSON/JSONL to mix into train")
    parser.add_argument("--output_dir", type=Path, default=default_output_dir)
    parser.add_argument(
        "--piles_dir", type=Path, default=PILES_DIR, help="pile folder (default: chattune/domains/homeassistant/piles)"
    )
    parser.add_argument(
        "--max_devices",
        type=int,
        default=DEFAULT_MAX_DEVICES,
        help=f"most devices listed per system prompt (default {DEFAULT_MAX_DEVICES}): 30%% of the prompts list a small "
        "house (up to 6 devices), the rest between half the cap and the cap, filled a room at a time; 32 gives "
        "houses of real size",
    )
    parser.add_argument(
        "--compact_prompt",
        action="store_true",
        help="short system prompts (the persona's first sentence, the Services line and the device list)",
    )
    parser.set_defaults(size="small", fmt="sharegpt")
    return parser


@entry_point
def main(argv: Sequence[str] | None = None, default_output_dir: Path = Path("data")) -> int:
    """The generator's command line; files go to --output_dir, by default `default_output_dir` (./data)."""
    args = build_parser(default_output_dir).parse_args(argv)
    config = GenerateConfig(
        output_dir=args.output_dir,
        piles_dir=args.piles_dir,
        languages=args.language,
        size=args.size,
        train=args.train,
        test=args.test,
        sample=args.sample,
        dpo=args.dpo,
        fmt=args.fmt,
        tool_set=args.tool_set,
        no_system_role=args.no_system_role,
        seed=args.seed,
        merge=args.merge,
        max_devices=args.max_devices,
        compact_prompt=args.compact_prompt,
        per_language_files=args.per_language_files,
    )
    result = generate(config)
    print(result.table)
    for path in result.files.values():
        print(f"wrote {path}")
    return 0
