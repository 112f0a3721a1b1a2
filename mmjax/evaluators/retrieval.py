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
        return recalls(self, variables, split, "image", "i")


def recalls(ev: base.Evaluator, variables: Mapping[str, Any], split: str, other: str,
            tag: str) -> dict[str, float]:
    """``<tag>2t_recall@k`` and ``t2<tag>_recall@k`` of contrastive head ``ev.task`` between
    modality ``other`` and the text, plus their mean (``mmjax.evaluators.video_retrieval``
    reuses it for clips)."""
    embed = ev.env.apply("embed", task=ev.task)
    emb, txt, ids = [], [], []
    for batch in ev.env.batches(split):
        keep = base.valid_rows(batch)
        out = embed(variables, {other: batch[other], "text": base.text_of(batch)})
        emb.append(np.asarray(out[f"{other}_embeds"])[keep])
        txt.append(np.asarray(out["text_embeds"])[keep])
        ids.append(np.asarray(batch["text"]["ids"])[keep])
    a_e, txt_e = np.concatenate(emb), np.concatenate(txt)
    groups = row_groups(np.concatenate(ids))
    sim = a_e.astype(np.float64) @ txt_e.astype(np.float64).T
    ks = tuple(int(k) for k in ev.cfg.get("ks", (1, 5, 10)))
    a2t = recall_at_k(sim, groups, groups, ks)
    t2a = recall_at_k(sim.T, groups, groups, ks)
    out = {f"{tag}2t_recall@{k}": v for k, v in a2t.items()}
    out.update({f"t2{tag}_recall@{k}": v for k, v in t2a.items()})
    out["mean_recall"] = float(np.mean(list(a2t.values()) + list(t2a.values())))
    out["num_distinct_texts"] = float(groups.max() + 1)
    return out
