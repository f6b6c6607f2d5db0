"""Reading pile files (CSV with a header row, or TXT with one item per line) with file:line errors.

Blank lines and lines starting with `#` are skipped in both kinds, so pile writers can group rows
under comments. Every CSV row is parsed on its own line: a quoted cell may hold commas, not newlines.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chattune.domains.homeassistant.datagen.errors import PileError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Row:
    """One data row: `where` is "path:line" for error messages."""

    where: str
    values: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.values.get(column, "")


def _content_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise PileError(f"{path}: pile file is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PileError(f"{path}: not valid UTF-8 ({exc})") from exc
    return [
        (number, line)
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def read_txt(path: Path) -> list[str]:
    """Items of a TXT pile, one per non-blank line."""
    items = [line.strip() for _, line in _content_lines(path)]
    if not items:
        raise PileError(f"{path}: no items (one item per line expected)")
    return items


def read_csv(
    path: Path, required: Sequence[str], optional: Sequence[str] = (), extra_columns: bool = False
) -> tuple[list[str], list[Row]]:
    """Rows of a CSV pile; checks the header, the column count and that required cells are filled.

    `optional` columns may be left empty; `extra_columns` lets a file add columns of its own
    (grammatical forms in the device files).
    """
    expected = ",".join([*required, *optional]) + (",[extra columns]" if extra_columns else "")
    lines = _content_lines(path)
    if not lines:
        raise PileError(f"{path}: empty file; expected a header row with columns {expected}")
    header_line, header_text = lines[0]
    header = _cells(header_text)
    _check_header(path, header_line, header, required, optional, extra_columns, expected)
    rows = [_row(path, number, text, header, required) for number, text in lines[1:]]
    if not rows:
        raise PileError(f"{path}: no data rows below the header ({expected})")
    return header, rows


def _cells(text: str) -> list[str]:
    return [cell.strip() for cell in next(csv.reader([text], skipinitialspace=True))]


def _check_header(
    path: Path,
    line: int,
    header: list[str],
    required: Sequence[str],
    optional: Sequence[str],
    extra_columns: bool,
    expected: str,
) -> None:
    known = {*required, *optional}
    missing = [column for column in required if column not in header]
    unknown = [column for column in header if column not in known]
    if missing or (unknown and not extra_columns) or len(set(header)) != len(header):
        raise PileError(f"{path}:{line}: bad header {','.join(header)!r}; expected columns {expected}")


def _row(path: Path, number: int, text: str, header: list[str], required: Sequence[str]) -> Row:
    where = f"{path}:{number}"
    cells = _cells(text)
    if len(cells) != len(header):
        raise PileError(
            f"{where}: expected {len(header)} columns ({','.join(header)}), got {len(cells)}"
            " (quote cells that contain commas)"
        )
    row = Row(where, dict(zip(header, cells)))
    for column in required:
        if not row[column]:
            raise PileError(f"{where}: column '{column}' is empty (columns: {','.join(header)})")
    if "split" in row.values and row["split"] not in SPLITS:
        raise PileError(f"{where}: split must be train or test, got {row['split']!r}")
    return row


def read_key_values(path: Path, required_keys: Sequence[str]) -> dict[str, str]:
    """A `key,value` CSV as a dict; every required key must be present exactly once."""
    _, rows = read_csv(path, ("key", "value"))
    result: dict[str, str] = {}
    for row in rows:
        if row["key"] in result:
            raise PileError(f"{row.where}: key {row['key']!r} appears twice")
        result[row["key"]] = row["value"]
    missing = [key for key in required_keys if key not in result]
    if missing:
        raise PileError(f"{path}: missing keys: {', '.join(missing)} (columns: key,value)")
    return result
