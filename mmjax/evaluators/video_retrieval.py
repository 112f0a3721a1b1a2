"""Video→text and text→video recall@1/5/10 of a contrastive head over a split's pairs
(``model.heads.<task>.modalities = ("video", "text")``), counted as ``retrieval`` counts them:
a retrieved text is correct when it is token-for-token the query's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.evaluators import base, retrieval


class Evaluator(base.Evaluator):
    reads = ("video", "text")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        return retrieval.recalls(self, variables, split, "video", "v")
