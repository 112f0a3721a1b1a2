"""Greedy captions of a caption head against the reference text: exact match of the decoded
words, and corpus BLEU-4 (Papineni et al. 2002: clipped n-gram precisions for n = 1..4,
geometric mean, brevity penalty; one reference per image; no smoothing, so a corpus with no
matching 4-gram scores 0). ``max_len`` (default ``data.max_len``) bounds the decoding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.evaluators import base
from mmjax.evaluators.metrics import corpus_bleu


class Evaluator(base.Evaluator):
    reads = ("text",)
    unprefixed = ("exact_match", "bleu")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        head = self.env.model_cfg["heads"][self.task]
        modality = head.get("modality", "image")
        max_len = int(self.cfg.get("max_len", 0) or self.env.data_config.max_len)
        generate = self.env.apply("generate", task=self.task, max_len=max_len)
        hyps: list[list[str]] = []
        refs: list[list[str]] = []
        for batch in self.env.batches(split):
            keep = base.valid_rows(batch)
            out = np.asarray(generate(variables, {modality: batch[modality]}))[keep]
            hyps += [h.split() for h in self.env.tokenizer.decode(out)]
            refs += [r.split() for r in self.env.tokenizer.decode(
                np.asarray(batch["text"]["ids"])[keep])]
        exact = float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])) if hyps else 0.0
        return {"exact_match": exact, "bleu": corpus_bleu(hyps, refs)}
