"""`chattune-grammar`: write the GBNF grammar for one house, for llama.cpp (`--grammar-file`), llama-server and
home-llm's Home Assistant integration, which constrain their replies with a GBNF file.

    python3 scripts/house_grammar.py PROMPT.txt --out house.gbnf    # a system prompt: Services and Devices lines
    python3 scripts/house_grammar.py data/home_assistant_handwritten.jsonl --row 1 --out house.gbnf
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from chattune.atomic import write_text_atomic
from chattune.cli import entry_point
from chattune.domains.homeassistant.grammar import house_from_messages, house_grammar
from chattune.errors import ChattuneError


class GrammarInputError(ChattuneError, ValueError):
    """A prompt file without a house, or a dataset row that is not there."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chattune-grammar", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "prompt",
        help="A text file holding the system prompt (its `Services:` line and `Devices:` list, as the model was "
        "trained with), '-' for standard input, or a .jsonl dataset with --row.",
    )
    parser.add_argument(
        "--row", type=int, default=None, help="With a .jsonl dataset: the 1-based row whose prompt to use."
    )
    parser.add_argument("--out", default=None, help="Where to write the grammar (default: standard output).")
    return parser.parse_args(argv)


def read_house_prompt(prompt: str, row: int | None) -> list[dict]:
    """The prompt's messages: one system message from a text file, or a dataset row's messages."""
    if prompt == "-":
        return [{"role": "system", "content": sys.stdin.read()}]
    path = Path(prompt)
    if not path.is_file():
        raise GrammarInputError(f"{prompt}: no such file")
    if row is None:
        return [{"role": "system", "content": path.read_text(encoding="utf-8")}]
    lines = path.read_text(encoding="utf-8").splitlines()
    if not 1 <= row <= len(lines):
        raise GrammarInputError(f"{prompt}: --row {row} is not there (the file has {len(lines)} rows)")
    try:
        record = json.loads(lines[row - 1])
    except ValueError as error:
        raise GrammarInputError(f"{prompt}:{row}: not a JSON row ({error})") from None
    messages = record.get("conversations") or record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise GrammarInputError(f"{prompt}:{row}: no `conversations` or `messages` list")
    return [m for m in messages if isinstance(m, dict)]


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    messages = read_house_prompt(args.prompt, args.row)
    house = house_from_messages(messages)
    if house is None:
        where = f"{args.prompt}:{args.row}" if args.row else args.prompt
        raise GrammarInputError(f"{where}: no `Devices:` line, so there is no house to build a grammar for")
    grammar = house_grammar(house)
    if args.out is None:
        sys.stdout.write(grammar)
    else:
        write_text_atomic(args.out, grammar)
        print(f"wrote {args.out}: {len(house.devices)} devices, {len(house.services)} services", file=sys.stderr)
    return 0
