"""Image→text and text→image recall@1/5/10 of a contrastive head over a split's pairs.

A retrieved item counts as correct when its text is token-for-token the query's own text: the
embedded data repeats captions (180 distinct ones), and counting only the pair's own index
would score a correct duplicate as a miss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.evaluators import base
from mmjax.evaluators.metrics import recall_at_k, row_groups


class Evaluator(base.Evaluator):
    reads = ("image", "text")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        embed = self.env.apply("embed", task=self.task)
        img, txt, ids = [], [], []
        for batch in self.env.batches(split):
            keep = base.valid_rows(batch)
            out = embed(variables, {"image": batch["image"], "text": base.text_of(batch)})
            img.append(np.asarray(out["image_embeds"])[keep])
            txt.append(np.asarray(out["text_embeds"])[keep])
            ids.append(np.asarray(batch["text"]["ids"])[keep])
        img_e, txt_e = np.concatenate(img), np.concatenate(txt)
        groups = row_groups(np.concatenate(ids))
        sim = img_e.astype(np.float64) @ txt_e.astype(np.float64).T
        ks = tuple(int(k) for k in self.cfg.get("ks", (1, 5, 10)))
        i2t = recall_at_k(sim, groups, groups, ks)
        t2i = recall_at_k(sim.T, groups, groups, ks)
        out = {f"i2t_recall@{k}": v for k, v in i2t.items()}
        out.update({f"t2i_recall@{k}": v for k, v in t2i.items()})
        out["mean_recall"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
        out["num_distinct_texts"] = float(groups.max() + 1)
        return out
