"""Metrics over a split, pure numpy (tested against nltk and brute force)."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np


def recall_at_k(
    sim: np.ndarray, query_groups: np.ndarray, item_groups: np.ndarray, ks: Sequence[int]
) -> dict[int, float]:
    """Fraction of queries (rows of ``sim``) with an item of their own group among the top k."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = item_groups[order] == query_groups[:, None]  # [Q, I] in rank order
    out = {}
    for k in ks:
        out[k] = float(hits[:, : min(k, hits.shape[1])].any(axis=1).mean()) if len(hits) else 0.0
    return out


def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """Corpus BLEU with one reference per hypothesis, uniform weights over n = 1..max_n."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def row_groups(rows: np.ndarray) -> np.ndarray:
    """An integer per row of ``rows`` [N, L], equal exactly for identical rows."""
    _, inverse = np.unique(rows, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def normalized(text: str) -> str:
    """Lower case, single spaces: how answers are compared as strings."""
    return " ".join(str(text).lower().split())
