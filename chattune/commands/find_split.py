"""Command line of find_split.py (and chattune-find-split): load a tokenizer, run the split finder, print what it
found."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from chattune.cli import entry_point
from chattune.data.split_finder import SplitReport, find_split
from chattune.errors import ChattuneError
from chattune.models.tokenizer import load_tokenizer

DESCRIPTION = (
    "Print the token ids that open and close an assistant response in MODEL's chat template, verified in context, "
    "and the --prefix_ids/--suffix_ids flags that reproduce train.py's automatic mask."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="find_split.py", description=DESCRIPTION)
    parser.add_argument("model", help="hub id, local folder or .gguf file of the model (only its tokenizer is loaded)")
    parser.add_argument("--template", help="a Jinja chat template file to try instead of the tokenizer's own")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if (
        ("/" in args.model or args.model.startswith("."))
        and not Path(args.model).exists()
        and args.model.count("/") != 1
    ):
        raise ChattuneError(f"{args.model}: no such folder (and not a hub id of the form owner/name)")
    tokenizer = load_tokenizer(args.model)  # a GGUF file's too; one that cannot be loaded is a one-line error
    template = read_template(args.template) if args.template else None
    if not (template or tokenizer.chat_template):
        raise ChattuneError(
            f"{args.model} has no chat template. Try one with --template FILE, or train with "
            "train.py --add_chatml_tokens, which adds ChatML tokens and template."
        )
    report = find_split(tokenizer, args.model, template)
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        print_report(report, tokenizer)
    return 0 if report.prefix_ids and report.verified else 1


def read_template(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ChattuneError(f"--template {path}: {error.strerror}") from None


def print_report(report: SplitReport, tokenizer: Any) -> None:
    sample = report.samples[0]
    print(f"model: {report.model}\n\nrendered sample:\n{sample.text}\n")
    print(f"token ids:\n{sample.input_ids}\n")
    print("labelled by train.py's automatic masking:")
    for span in sample.spans:
        print(f"  {sample.text[span.label_start : span.label_end]!r}")
    if report.prefix_ids:
        print(f"\nresponse prefix in context: {report.prefix_ids} = {shown(tokenizer, report.prefix_ids)}")
    if report.suffix_ids:
        print(f"response suffix in context: {report.suffix_ids} = {shown(tokenizer, report.suffix_ids)}")
    if report.prefix_ids:
        suffix = f" --suffix_ids {','.join(map(str, report.suffix_ids))}" if report.suffix_ids else ""
        print(f"\nflags: --prefix_ids {','.join(map(str, report.prefix_ids))}{suffix}")
    print(f"verified on every assistant turn (with and without system prompt): {yes(report.verified)}")
    print(f"same mask as train.py's automatic mode: {yes(report.auto_mode_matches)}")
    if report.notes:
        print("\nnotes:")
        for note in report.notes:
            print(f"  - {note}")


def shown(tokenizer: Any, ids: list[int]) -> str:
    return " ".join(repr(token) for token in tokenizer.convert_ids_to_tokens(ids))


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"
