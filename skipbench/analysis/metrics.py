"""Metrics of a generated text: ROUGE-L through rouge-score (with stemming) and exact match per subtask (no torch;
the training loss's KL lives with the loop, training/loop.py)."""

from __future__ import annotations

import math
import re
from functools import lru_cache

_INT = re.compile(r"-?\d[\d,]*")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemming)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def integers(text: str) -> list[int]:
    out = []
    for tok in _INT.findall(text):
        digits = tok.replace(",", "")
        if digits not in ("", "-"):
            out.append(int(digits))
    return out


def exact_match(subtask: str, output: str, answer: str | None) -> float:
    """1.0/0.0 where the dataset defines an answer, NaN elsewhere.

    sum/product: the last number in the output equals the answer (thousands separators allowed);
    repeat: the numbers in the output are exactly the list repeated 5 times;
    qa: the answer appears in the output (case-insensitive).
    """
    if answer is None:
        return math.nan
    if subtask in ("sum", "product"):
        found = integers(output)
        return float(bool(found) and found[-1] == int(answer))
    if subtask == "repeat":
        return float(integers(output) == [int(x) for x in answer.split(",")])
    return float(answer.lower() in output.lower())


def pooled_per_token(rows, attention: bool = False) -> float:
    """Layers (or, with `attention`, attention sub-layers) per generated token, pooled over the rows' tokens: the
    compute a matched random control is matched to (evaluate --matched-random) and the report states."""
    tokens = rows["layers_per_token"].map(len)
    if attention:
        return float((rows["attention_mean"].fillna(0) * tokens).sum() / max(tokens.sum(), 1))
    return float(rows["layers_per_token"].map(sum).sum() / max(tokens.sum(), 1))
