"""Output formats (ShareGPT-style conversations or a raw ChatML corpus), atomic writes, the counts table."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from chattune.atomic import atomic_path
from chattune.domains.homeassistant.datagen.examples import Example
from chattune.domains.homeassistant.datagen.prompts import opening_turns
from chattune.models.chatml import render_chatml

FORMATS = ("sharegpt", "raw_corpus", "tool_calls")


def example_record(example: Example, fmt: str, no_system_role: bool = False) -> dict[str, Any]:
    """One output line for `example` in format `fmt`: its conversation, or (raw corpus) that conversation as
    train.py's ChatML template renders it. `no_system_role` opens the user turn with the system text instead."""
    opening = opening_turns(example.system, example.user, no_system_role)
    conversations = [*opening, {"role": "assistant", "content": example.assistant}]
    if fmt == "raw_corpus":
        return {"text": render_chatml(conversations), "language": example.language, "kind": example.kind}
    return {"conversations": conversations, "language": example.language, "kind": example.kind}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines atomically: a crash leaves the old file (or none), never half of a new one."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def count_table(title: str, counts: Counter, languages: Sequence[str], kinds: Sequence[str]) -> str:
    """A plain-text table of counts per language (rows) and kind (columns), with totals."""
    header = ["language", *kinds, "total"]
    rows = []
    for language in [*languages, "total"]:
        values = [
            sum(n for (lang, kind), n in counts.items() if kind == k and language in (lang, "total")) for k in kinds
        ]
        rows.append([language, *map(str, values), str(sum(values))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells))

    rule = "-" * len(line(header))
    return "\n".join([title, line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])
