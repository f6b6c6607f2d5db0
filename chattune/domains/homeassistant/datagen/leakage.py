"""Held-out phrasing checks: does a test phrasing, or a near copy of one, appear in training?

Two phrasings count as the same when, after normalisation (lowercase, punctuation stripped, every
placeholder, device name and drawn value replaced by one fixed token), their rapidfuzz `fuzz.ratio`
reaches NEAR_COPY_RATIO. "Turn on the {device}!" and "turn on {device}" are then one phrasing; a test
set built from such pairs would measure memory, not generalisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from rapidfuzz import fuzz, process

from chattune.domains.homeassistant.datagen.devices import Device
from chattune.domains.homeassistant.datagen.piles import LanguagePile
from chattune.domains.homeassistant.datagen.templates import PLACEHOLDER_RE

NEAR_COPY_RATIO = 90.0
# Stands for a replaced span; upper case, so no (lowercased) word of a phrasing can equal it.
SLOT_TOKEN = "SLOT"
_MARK = "\x00"  # the span marker while punctuation is stripped (neither a word character nor space)
_PUNCTUATION_RE = re.compile(r"[^\w\s\x00]|_")
_SPACE_RE = re.compile(r"\s+")
_NUMBER_RE = re.compile(r"\d+")


@dataclass(frozen=True)
class NearCopy:
    """A test phrasing and the train phrasing it nearly copies."""

    test_where: str
    test_text: str
    train_where: str
    train_text: str
    ratio: float


class Normaliser:
    """Maps a phrasing or a generated user turn to the text the near-copy comparison sees."""

    def __init__(self, fillers: Iterable[str] = ()) -> None:
        # Longest first, so "Kitchen Ceiling Light" is replaced whole rather than as "Kitchen" + rest.
        words = sorted({filler.casefold() for filler in fillers if filler.strip()}, key=lambda w: (-len(w), w))
        self._fillers = re.compile("|".join(rf"(?<!\w){re.escape(word)}(?!\w)" for word in words)) if words else None

    def __call__(self, text: str) -> str:
        text = PLACEHOLDER_RE.sub(f" {_MARK} ", text.casefold())
        if self._fillers is not None:
            text = self._fillers.sub(f" {_MARK} ", text)
        text = _PUNCTUATION_RE.sub(" ", _NUMBER_RE.sub(f" {_MARK} ", text))
        return _SPACE_RE.sub(" ", text).strip().replace(_MARK, SLOT_TOKEN)


def pile_fillers(pile: LanguagePile) -> list[str]:
    """Every text a placeholder can be filled with: device names and their forms, and the value vocabularies."""
    fillers = [text for devices in pile.devices.values() for device in devices for text in device_texts(device)]
    fillers += [name for name, _ in pile.vocab.colors] + [phrase for phrase, _ in pile.vocab.durations]
    return fillers + list(pile.vocab.media) + list(pile.vocab.items)


def device_texts(device: Device) -> list[str]:
    """The name and every grammatical form of a device: the texts {device} and {device_<form>} become."""
    return [device.name, *(text for _, text in device.forms)]


def split_phrasings(pile: LanguagePile) -> dict[str, list[tuple[str, str]]]:
    """The user-side phrasings of every split-bearing pile, as {split: [(file:line, text)]}."""
    rows = [(t.split, t.where, t.request) for t in pile.actions]
    rows += [(t.split, t.where, t.request) for t in pile.multi]
    rows += [(t.split, t.where, t.request) for t in pile.specific]
    rows += [(t.split, t.where, t.question) for t in pile.status]
    phrasings: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for split, where, text in rows:
        phrasings[split].append((where, text))
    return phrasings


def near_copies(
    train: list[tuple[str, str]],
    test: list[tuple[str, str]],
    normalise: Normaliser,
    threshold: float = NEAR_COPY_RATIO,
) -> list[NearCopy]:
    """Test texts whose normalised form scores `threshold` or more against some normalised train text."""
    train_by_text: dict[str, tuple[str, str]] = {}
    for where, text in train:
        train_by_text.setdefault(normalise(text), (where, text))
    choices = list(train_by_text)
    found = []
    checked: set[str] = set()
    for where, text in test:
        key = normalise(text)
        if key in checked:
            continue
        checked.add(key)
        best = process.extractOne(key, choices, scorer=fuzz.ratio, score_cutoff=threshold)
        if best is not None:
            train_where, train_text = train_by_text[best[0]]
            found.append(NearCopy(where, text, train_where, train_text, best[1]))
    return found


def pile_near_copies(pile: LanguagePile, threshold: float = NEAR_COPY_RATIO) -> list[NearCopy]:
    """Near copies between the test and train phrasings of one language's piles."""
    phrasings = split_phrasings(pile)
    return near_copies(phrasings["train"], phrasings["test"], Normaliser(pile_fillers(pile)), threshold)


def describe(copies: list[NearCopy]) -> str:
    """One line per near copy, for an error message."""
    return "\n".join(
        f"{c.test_where}: {c.test_text!r} ~ {c.train_where}: {c.train_text!r} (ratio {c.ratio:.0f})" for c in copies
    )
