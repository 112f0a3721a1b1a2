"""Zero-shot classification with a contrastive head: each image takes the class whose prompt's
text embedding is nearest.

``classes``: ``"labels"`` (the dataset's label names, scored against each example's label) or
``"shapes_objects"`` (the 18 "colour shape" phrases of the embedded data, right if that object
is one of the image's two); ``prompt``: a template with one ``{}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.data import shapes
from mmjax.evaluators import base


class Evaluator(base.Evaluator):
    reads = ("image", "text")

    def _classes(self) -> list[str]:
        source = self.cfg.get("classes", "labels")
        if source == "labels":
            return self.env.label_names
        if source == "shapes_objects":
            return [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
        raise ValueError(f"evals.{self.name}.classes={source!r}; use labels or shapes_objects")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        embed = self.env.apply("embed", task=self.task)
        classes = self._classes()
        prompt = self.cfg.get("prompt", "{}")
        max_len = int(self.env.data_config.max_len)
        ids, mask = self.env.tokenizer.encode([prompt.format(c) for c in classes], max_len)
        text = {"text": {"ids": np.asarray(ids), "mask": np.asarray(mask)}}
        class_emb = np.asarray(embed(variables, text)["text_embeds"])
        source = self.cfg.get("classes", "labels")
        correct, seen = 0, 0
        for batch in self.env.batches(split):
            keep = base.valid_rows(batch)
            img = np.asarray(embed(variables, {"image": batch["image"]})["image_embeds"])
            pred = np.argmax(img @ class_emb.T, axis=1)[keep]
            if source == "labels":
                ok = pred == np.asarray(batch["label"])[keep]
            else:
                rows = np.arange(seen, seen + int(keep.sum()))
                ok = self._shapes_hits(split, rows, pred)
            correct += int(ok.sum())
            seen += int(keep.sum())
        return {"accuracy": correct / max(seen, 1), "num_classes": float(len(classes))}

    def _shapes_hits(self, split: str, rows: np.ndarray, pred: np.ndarray) -> np.ndarray:
        data = self.env.data_config
        if data.name != "shapes":
            raise ValueError(f"evals.{self.name}.classes='shapes_objects' needs data.name=shapes")
        layout = shapes.sample_layout(split, rows, seed=int(data.get("seed", 0) or 0))
        objects = layout.colours * len(shapes.SHAPES) + layout.shapes  # [n, 2] phrase indices
        return (objects == pred[:, None]).any(axis=1)
