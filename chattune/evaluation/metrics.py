"""Text metrics that know nothing of the task: ratios, perplexity, corpus BLEU and ROUGE-L.

The rule throughout is that a metric with nothing to measure is None, never 0 or 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any


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


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 (0-1). Two empty texts agree perfectly; rouge-score would call that 0."""
    if not hypotheses:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWordTokenizer())
    total = 0.0
    for hypothesis, reference in zip(hypotheses, references):
        if not _WORD_RE.search(hypothesis) and not _WORD_RE.search(reference):
            total += 1.0
        else:
            total += scorer.score(reference, hypothesis)["rougeL"].fmeasure
    return total / len(hypotheses)
