"""Text metrics for evaluation: ROUGE-1/2/L (the ``rouge-score`` package), SQuAD-style exact match,
mean length, and perplexity from summed negative log-likelihoods.

Scores of a set of examples are means over examples (each example counts once, whatever its length);
perplexity is ``exp(total NLL / total tokens)`` over every learned token of the set.
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> list[dict[str, float]]:
    """Per example ``{"rouge1", "rouge2", "rougeL"}`` F-measures (``rouge-score``'s tokenizer: lowercase,
    alphanumeric words); ``use_stemmer`` applies the Porter stemmer as ``rouge-score`` does."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _scorer(use_stemmer)
    out = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        out.append({name: float(scores[name].fmeasure) for name in ROUGE_TYPES})
    return out


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sequence."""
    return float(sum(values) / len(values)) if len(values) else 0.0


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp(total_nll / total_tokens)``; NaN when there are no tokens."""
    if total_tokens <= 0:
        return float("nan")
    return float(math.exp(total_nll / total_tokens))


def text_scores(predictions: Sequence[str], references: Sequence[str], lengths: Sequence[int],
                use_stemmer: bool = False) -> dict[str, float]:
    """Means over examples: ROUGE-1/2/L, exact match and length (``lengths``: tokens per prediction)."""
    rouge = rouge_scores(predictions, references, use_stemmer)
    result = {name: mean([r[name] for r in rouge]) for name in ROUGE_TYPES}
    result["exact_match"] = mean([exact_match(p, r) for p, r in zip(predictions, references)])
    result["mean_length"] = mean([float(n) for n in lengths])
    return result
