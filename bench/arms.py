"""The `--arms` option the benchmarks share: a comma-separated subset of their arms, in the documented order."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def arm_list(arms: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse `type` that reads "a,b" into the arms named, refusing names not in `arms`."""

    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = sorted(set(chosen) - set(arms))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown or text!r}; choose from {','.join(arms)}")
        return tuple(arm for arm in arms if arm in chosen)

    return parse
