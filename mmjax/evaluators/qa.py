"""Answer accuracy of a classification head by string (the predicted label name against the
gold one), overall and per question type (the question's first two words)."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.evaluators import base
from mmjax.evaluators.metrics import normalized


class Evaluator(base.Evaluator):
    reads = ("text",)

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        fwd = self.env.apply("__call__")
        names = self.env.label_names
        by_type: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        correct = total = 0
        for batch in self.env.batches(split):
            keep = base.valid_rows(batch)
            logits = np.asarray(fwd(variables, base.model_inputs(batch))[self.task]["logits"])
            pred = np.argmax(logits, axis=1)[keep]
            gold = np.asarray(batch["label"])[keep]
            questions = self.env.tokenizer.decode(np.asarray(batch["text"]["ids"])[keep])
            for p, g, q in zip(pred, gold, questions, strict=True):
                ok = normalized(names[p]) == normalized(names[g])
                qtype = "_".join(q.split()[:2]) or "empty"
                by_type[qtype][0] += ok
                by_type[qtype][1] += 1
                correct += ok
                total += 1
        out = {"accuracy": correct / max(total, 1)}
        out.update({f"accuracy_{t}": c / n for t, (c, n) in sorted(by_type.items())})
        return out
