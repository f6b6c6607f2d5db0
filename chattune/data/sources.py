"""Where rows come from: one or more sources per split, each loaded and detected on its own, mixed by weight.

A source is written `[prefix:]location[:weight]`:

* a local `.jsonl` / `.json` / `.parquet` file, or a `.txt` file of completion text (one document per block of
  lines, blocks separated by blank lines);
* a folder written by `datasets.save_to_disk`, or a folder of data files laid out like a hub dataset repository;
* a hub dataset id, `org/name[:split][@revision]`, loaded with `datasets.load_dataset`.

The prefixes `jsonl:`, `text:` and `local:` (torchllms' spellings) force a file's reading or keep a path from being
taken for a hub id; `hub:` does the opposite. A weight (`data/a.jsonl:0.8 alpaca.jsonl:0.2`) is a share of the
mixture: every source is shuffled with the run's seed, then `datasets.interleave_datasets` draws each example from
a source picked with those probabilities, until the first source runs out. Without weights, the sources are
concatenated, every row used once. One source without a weight is read exactly as a single path always was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chattune.data.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

PREFIXES = ("jsonl", "text", "local", "hub")
FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
# Files that `save_to_disk` writes into a Dataset folder and a DatasetDict folder.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
SOURCES_HELP = (
    "a .jsonl/.json/.parquet/.txt file, a datasets folder, or a hub dataset id org/name[:split][@revision], "
    "optionally prefixed jsonl:, text:, local: or hub: and followed by :weight"
)


@dataclass(frozen=True)
class Source:
    """One source of rows, as parsed from its spelling."""

    text: str  # as the user wrote it: every message and log line names the source this way
    kind: str  # "json", "parquet", "text" (a file), "folder" (local) or "hub"
    location: str  # a path, or a hub id
    split: str | None = None
    revision: str | None = None
    weight: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def parse_sources(specs: str | Sequence[str], flag: str = "--train_dataset") -> list[Source]:
    """The sources of one split; all weighted or none, each weight a positive number."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    if not specs:
        raise DataError(f"{flag} needs at least one source: {SOURCES_HELP}")
    sources = [parse_source(str(spec), flag) for spec in specs]
    _refuse_repeated(sources, flag)
    weighted = [source.text for source in sources if source.weight is not None]
    if weighted and len(weighted) != len(sources):
        unweighted = [source.text for source in sources if source.weight is None]
        raise DataError(
            f"{flag}: {', '.join(weighted)} have a weight but {', '.join(unweighted)} do not; give every source a "
            "weight (a share of the mixture, e.g. a.jsonl:0.8 b.jsonl:0.2) or none (every row of every source once)"
        )
    return sources


def _refuse_repeated(sources: list[Source], flag: str) -> None:
    """The same file (or hub split) given twice would be read twice: every row of it trained twice, silently."""
    seen: dict[tuple, str] = {}
    for source in sources:
        where = source.location if source.kind == "hub" else str(Path(source.location).expanduser().resolve())
        key = (where, source.split, source.revision)
        if key in seen:
            raise DataError(
                f"{flag}: {seen[key]} and {source.text} are the same source, so each of its rows would be used "
                "twice; give it once, or give weights to sample it more often (a.jsonl:0.7 b.jsonl:0.3)"
            )
        seen[key] = source.text


def parse_source(spec: str, flag: str = "--train_dataset") -> Source:
    """`[prefix:]location[:weight]` -> Source. A path that exists is never split at its colons."""
    prefix, rest = _split_prefix(spec)
    location, weight = _split_weight(spec, rest, flag)
    if prefix == "hub" or (prefix is None and not _is_local(location)):
        return _hub_source(spec, location, weight, flag)
    path, split = location, None
    if not Path(path).exists() and ":" in path:  # `folder:split`
        head, _, tail = path.rpartition(":")
        if Path(head).is_dir():
            path, split = head, tail
    return Source(spec, _local_kind(spec, prefix, Path(path), flag), path, split=split, weight=weight)


def _split_prefix(spec: str) -> tuple[str | None, str]:
    head, colon, rest = spec.partition(":")
    if colon and head in PREFIXES and not Path(spec).exists():
        return head, rest
    return None, spec


def _split_weight(spec: str, rest: str, flag: str) -> tuple[str, float | None]:
    """A trailing `:number` is a weight, unless the whole is an existing path; it must be positive and finite."""
    head, colon, tail = rest.rpartition(":")
    if not colon or Path(rest).exists():
        return rest, None
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).is_file():  # a file has no splits, so the tail can only be a (bad) weight
            raise DataError(f"{flag} {spec}: weight {tail!r} is not a number; write {head}:0.5") from None
        return rest, None  # a split (hub id or datasets folder), or part of a missing path
    if not (math.isfinite(weight) and weight > 0):
        raise DataError(f"{flag} {spec}: weight {tail} must be a positive number (a share of the mixture)")
    return head, weight


def _is_local(location: str) -> bool:
    """A path rather than a hub id: it exists, has a data file's suffix, or is spelled like a path."""
    path = Path(location)
    if path.exists() or Path(location.rpartition(":")[0] or location).is_dir():
        return True
    if path.suffix in FILE_KINDS or location.startswith((".", "/", "~")):
        return True
    return not HUB_ID.fullmatch(location.split("@")[0].split(":")[0])


def _local_kind(spec: str, prefix: str | None, path: Path, flag: str) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder ({flag} source {spec!r}); give {SOURCES_HELP}")
    if path.is_dir():
        if prefix in ("jsonl", "text"):
            raise DataError(f"{flag} {spec}: {path} is a folder; the {prefix}: prefix reads one file")
        return "folder"
    if prefix == "jsonl":
        return "json"
    if prefix == "text":
        return "text"
    if path.suffix not in FILE_KINDS:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet, .txt or a datasets folder "
            "(or say how to read it: jsonl:FILE, text:FILE)"
        )
    return FILE_KINDS[path.suffix]


def _hub_source(spec: str, location: str, weight: float | None, flag: str) -> Source:
    match = re.fullmatch(r"(?P<id>[^:@]+)(?::(?P<split>[^:@]+))?(?:@(?P<revision>[^:@]+))?", location)
    match = match or re.fullmatch(r"(?P<id>[^:@]+)@(?P<revision>[^:@]+):(?P<split>[^:@]+)", location)
    if not match or not HUB_ID.fullmatch(match["id"]):
        raise DataError(f"{flag} {spec}: neither an existing file or folder nor a hub dataset id; give {SOURCES_HELP}")
    return Source(spec, "hub", match["id"], match["split"], match["revision"], weight)


# ---------------------------------------------------------------------------------------------------------------
# Loading one source


def load_source(source: Source, default_split: str = "train") -> Dataset:
    """The rows of one source, with errors that name it (and the line, where there is one)."""
    loaders: dict[str, Callable[[Source, str], Dataset]] = {
        "json": _load_json,
        "parquet": _load_parquet,
        "text": _load_text,
        "folder": _load_folder,
        "hub": _load_hub,
    }
    return loaders[source.kind](source, default_split)


def _load_json(source: Source, _split: str) -> Dataset:
    from datasets import load_dataset

    path = Path(source.location)
    check_json_file(path)
    try:
        return load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parse errors in many types; name the file either way
        raise DataError(f"{path}: could not be read as {path.suffix or 'JSON lines'} ({error})") from error


def _load_parquet(source: Source, _split: str) -> Dataset:
    from datasets import load_dataset

    try:
        rows = load_dataset("parquet", data_files=source.location, split="train")
    except Exception as error:  # pyarrow's errors say what is wrong but not which file
        raise DataError(f"{source.location}: could not be read as parquet ({error})") from error
    if len(rows) == 0:
        raise DataError(f"{source.location}: holds no rows")
    return rows


def _load_text(source: Source, _split: str) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"text": text_blocks(Path(source.location))})


def _load_folder(source: Source, default_split: str) -> Dataset:
    from datasets import load_dataset, load_from_disk

    path = Path(source.location)
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        if source.split is not None and not (path / "dataset_dict.json").is_file():
            raise DataError(f"{source.text}: {path} holds one dataset, not splits; drop :{source.split}")
        return _one_split(load_from_disk(str(path)), source, default_split)
    try:  # a folder of data files laid out like a hub repository (data/train-*.parquet, test.jsonl, ...)
        data = load_dataset(str(path))  # every split (local files: cheap), so a wrong split can be listed
    except Exception as error:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise DataError(
            f"{path}: not a datasets folder: no {' or '.join(SAVED_DATASET_MARKERS)} (written by save_to_disk) and "
            f"no data files datasets can read ({type(error).__name__}); found: {found}"
        ) from error
    return _one_split(data, source, default_split)


def _load_hub(source: Source, default_split: str) -> Dataset:
    from datasets import load_dataset

    try:
        data = load_dataset(source.location, split=source.split, revision=source.revision)
    except ConnectionError as error:  # HF_HUB_OFFLINE, or no network
        raise DataError(
            f"{source.text}: no such local file or folder, and hub dataset {source.location!r} is not in the local "
            f"cache while the hub cannot be reached ({error}); give a local path ({SOURCES_HELP}), or load it once "
            "with network"
        ) from error
    except Exception as error:  # not found, gated, bad split or revision: datasets says which
        raise DataError(
            f"{source.text}: no such local file or folder, and hub dataset {source.location!r} cannot be loaded: "
            f"{error}"
        ) from error
    return _one_split(data, source, default_split)


def _one_split(data: object, source: Source, default_split: str) -> Dataset:
    """A Dataset as it is; of a DatasetDict, the split asked for, its only split, or `default_split`."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    wanted = source.split or (next(iter(data)) if len(data) == 1 else default_split)
    if wanted not in data:
        raise DataError(
            f"{source.text}: holds splits {sorted(data)}, not {wanted!r}; name one as {source.location}:SPLIT"
        )
    return data[wanted]


def check_json_file(path: Path) -> None:
    """Find the first bad line (not UTF-8, malformed, not an object) before `datasets` does, so the error can
    name it; and refuse a file without rows."""
    if path.suffix == ".json" and _first_character(path) == "[":
        text = _utf8(path.read_bytes(), path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {index} is {type(row).__name__}, expected an object")
        if not rows:
            raise DataError(f"{path}:1: an empty list; the file holds no rows")
        return
    rows = 0
    with path.open("rb") as file:
        for line_number, raw in enumerate(file, start=1):
            line = _utf8(raw, path, line_number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows += 1
    if not rows:
        raise DataError(f"{path}:1: empty file; one JSON object per line expected")


def _first_character(path: Path) -> str:
    with path.open("rb") as file:
        return file.read(64).decode("utf-8", errors="replace").strip()[:1]


def _utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data` decoded as UTF-8, or a DataError naming the line (counted from `first_line`) and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def text_blocks(path: Path) -> list[str]:
    """A .txt file's documents: blocks of lines separated by one or more blank lines (whitespace only)."""
    text = _utf8(path.read_bytes(), path).replace("\r\n", "\n")
    blocks = [block.strip("\n") for block in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text)]
    blocks = [block for block in blocks if block.strip()]
    if not blocks:
        raise DataError(f"{path}:1: empty file; a .txt source holds documents separated by blank lines")
    return blocks


def row_location(spec: str, index: int) -> str:
    """Where row `index` (from 0) of a source is, for a person to open: `FILE:LINE` for JSON lines and .txt
    files (blank lines skipped as the loaders skip them), else `SOURCE: row N`."""
    try:
        source = parse_source(spec)
    except DataError:
        source = None
    if source is not None and source.kind in ("json", "text"):
        path = Path(source.location)
        line = _first_line_of_row(path, index, blocks=source.kind == "text")
        if line is not None:
            return f"{path}:{line}"
    return f"{spec}: row {index + 1}"


def _first_line_of_row(path: Path, index: int, blocks: bool) -> int | None:
    """The line number row `index` starts on: the index-th non-blank line, or the first line of the index-th
    blank-line-separated block; None for a JSON array or a file shorter than that."""
    if path.suffix == ".json" and _first_character(path) == "[":
        return None
    rows, previous_blank = -1, True
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            blank = not raw.strip()
            if not blank and (previous_blank or not blocks):
                rows += 1
                if rows == index:
                    return number
            previous_blank = blank
    return None


# ---------------------------------------------------------------------------------------------------------------
# Several sources


def read_sources(
    specs: str | Sequence[str],
    prepare: Callable[[Dataset, Source], Dataset],
    *,
    seed: int,
    flag: str = "--train_dataset",
) -> Dataset:
    """Load each source, `prepare` it on its own (its format detected on its own), then mix or concatenate.

    `prepare(rows, source)` turns a source's rows into the dataset trained on (token ids, or preference rows);
    sources are combined after it, so each keeps its own format and its own `datasets` cache.
    """
    sources = parse_sources(specs, flag)
    default_split = "test" if flag == "--test_dataset" else "train"
    prepared = [prepare(load_source(source, default_split), source) for source in sources]
    if len(sources) == 1:
        return prepared[0]
    return combine(sources, prepared, seed)


def combine(sources: Sequence[Source], datasets: Sequence[Dataset], seed: int) -> Dataset:
    """Weighted sources sampled into a mixture with `seed`; unweighted ones concatenated. Logs the counts."""
    from datasets import concatenate_datasets, interleave_datasets

    _check_same_features(sources, datasets)
    tagged = [data.add_column("source_index", [index] * len(data)) for index, data in enumerate(datasets)]
    if sources[0].weight is None:
        mixed = concatenate_datasets(tagged)
    else:
        total = sum(source.weight for source in sources)
        mixed = interleave_datasets(
            [data.shuffle(seed=seed) for data in tagged],
            probabilities=[source.weight / total for source in sources],
            seed=seed,
            stopping_strategy="first_exhausted",
        )
    counts = Counter(mixed["source_index"])
    logger.info("%s", mixture_summary(sources, datasets, counts))
    return mixed.remove_columns("source_index")


def _check_same_features(sources: Sequence[Source], datasets: Sequence[Dataset]) -> None:
    first = datasets[0].features
    for source, data in zip(sources[1:], datasets[1:]):
        if data.features != first:
            raise DataError(
                f"{sources[0].text} and {source.text} cannot be mixed: their prepared rows differ ({first} vs "
                f"{data.features}); give sources whose rows have the same shape (e.g. both plain-text or both "
                "message-list preference prompts)"
            )


def mixture_summary(sources: Sequence[Source], datasets: Sequence[Dataset], counts: Counter) -> str:
    """The realised number of examples per source, of how many it had, and its share of the mixture."""
    total = sum(counts.values())
    lines = [f"data mixture: {total} examples from {len(sources)} sources"]
    for index, (source, data) in enumerate(zip(sources, datasets)):
        weight = "" if source.weight is None else f", weight {source.weight:g}"
        share = counts[index] / total if total else 0.0
        lines.append(f"  {counts[index]:>8} of {len(data):>8}  ({share:.1%}{weight})  {source.text}")
    return "\n".join(lines)
