"""Text metrics that know nothing of the task: ratios, perplexity, latency, corpus BLEU, ROUGE-1/2/L, METEOR and
normalised character edit distance, each computed by its maintained library (sacrebleu, rouge-score, nltk,
rapidfuzz).

The rule throughout is that a metric with nothing to measure is None, never 0 or 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

# Numbers closer than this count as equal: models write 0.4, 0.40 or 0.4000001 for the same volume.
NUMBER_TOLERANCE = 1e-4


def values_equal(a: Any, b: Any) -> bool:
    """Deep equality with numeric tolerance; booleans are never equal to numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=NUMBER_TOLERANCE, abs_tol=NUMBER_TOLERANCE)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[key], b[key]) for key in a)
    return a == b


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when nothing was counted."""
    return numerator / denominator if denominator else None


def perplexity(scores: Sequence[Any]) -> float | None:
    """exp of the token-weighted mean NLL: long answers weigh more, as in the training loss.

    Each score holds `nll_sum` (the summed NLL of its reference, None when not measured) and `n_tokens`.
    """
    tokens = sum(s.n_tokens for s in scores if s.nll_sum is not None)
    if not tokens:
        return None
    nll = sum(s.nll_sum for s in scores if s.nll_sum is not None)
    # NaN or overflowing losses (a diverged model, float16 overflow) have no meaningful perplexity, and
    # JSON has no Infinity: report None rather than crash or write a file strict parsers reject.
    mean = nll / tokens
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else None


_WORD_RE = re.compile(r"\w+", re.UNICODE)


class UnicodeWordTokenizer:
    """Lower-cased \\w+ words. rouge-score's default keeps only [a-z0-9], which erases ü, ł, é and every
    non-Latin script, so German or Polish replies would score on their ASCII fragments alone."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """sacrebleu corpus BLEU (0-100 scale, default 13a tokenization)."""
    if not hypotheses:
        return None
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1), keyed by ROUGE_TYPES. Two texts without a word agree perfectly;
    rouge-score would call that 0."""
    if not hypotheses:
        return dict.fromkeys(ROUGE_TYPES)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeWordTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        if _both_wordless(hypothesis, reference):
            scores = dict.fromkeys(ROUGE_TYPES, 1.0)
        else:
            scores = {name: score.fmeasure for name, score in scorer.score(reference, hypothesis).items()}
        for name in ROUGE_TYPES:
            totals[name] += scores[name]
    return {name: total / len(hypotheses) for name, total in totals.items()}


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 (0-1); see `rouge`."""
    return rouge(hypotheses, references)["rougeL"]


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no word has a synonym. WordNet's data is not on PyPI (nltk downloads
    it from GitHub), and looking it up only where it happens to be installed would make scores machine-dependent."""

    def synsets(self, word: str) -> list:
        return []


def meteor(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean nltk METEOR (0-1) over exact and Porter-stem word matches; WordNet synonym matching is off (see
    _NoSynonyms). Words are UnicodeWordTokenizer's; two texts without a word agree perfectly."""
    if not hypotheses:
        return None
    from nltk.translate.meteor_score import single_meteor_score

    words = UnicodeWordTokenizer()
    total = 0.0
    for hypothesis, reference in zip(hypotheses, references):
        if _both_wordless(hypothesis, reference):
            total += 1.0
        else:
            total += single_meteor_score(words.tokenize(reference), words.tokenize(hypothesis), wordnet=_NoSynonyms())
    return total / len(hypotheses)


def edit_distance(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean rapidfuzz Levenshtein distance per character, normalised by the longer text: 0 identical, 1 nothing
    in common (two empty texts: 0)."""
    if not hypotheses:
        return None
    from rapidfuzz.distance import Levenshtein

    distances = [Levenshtein.normalized_distance(h, r) for h, r in zip(hypotheses, references)]
    return sum(distances) / len(distances)


def latency(seconds: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and 95th percentile (linear interpolation, numpy's default) of the measured seconds per example."""
    measured = [s for s in seconds if s is not None]
    if not measured:
        return {"latency_mean_s": None, "latency_p95_s": None}
    import numpy

    return {"latency_mean_s": float(numpy.mean(measured)), "latency_p95_s": float(numpy.percentile(measured, 95))}


def _both_wordless(hypothesis: str, reference: str) -> bool:
    return not _WORD_RE.search(hypothesis) and not _WORD_RE.search(reference)
