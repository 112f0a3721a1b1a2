"""Fusion of per-modality token sequences: one module per kind, chosen by
``config.model.fusion.kind``.

- ``concat``: single stream over all modalities' tokens behind a fusion [CLS] (``concat.py``);
- ``cross_attention``: the ``query`` modality attends to the others (``cross_attention.py``);
- ``co_attention``: two streams that attend to each other (``co_attention.py``);
- ``late``: the towers' pooled features mixed by an MLP (``late.py``);
- ``bottleneck``: MBT's shared bottleneck tokens (``bottleneck.py``).

Every kind takes any number of modalities except ``co_attention`` (two streams). A modality may
be absent from some examples (``features[m]["present"]``, bool [B], False = absent): its tokens
are replaced by one learned per-modality token (``<m>_absent``; for ``late`` a learned pooled
vector) and the rest of its positions are masked, so the fusion never reads the placeholder
input of an absent modality. ``FUSIONS.register(kind, cls)`` adds a kind (a subclass of
``base.Fusion``); ``"none"`` builds no fusion (a two-tower model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.models import layers
from mmjax.models.fusion.base import Fusion, fill_absent
from mmjax.models.fusion.bottleneck import BottleneckFusion
from mmjax.models.fusion.co_attention import CoAttentionFusion
from mmjax.models.fusion.concat import ConcatFusion
from mmjax.models.fusion.cross_attention import CrossAttentionFusion
from mmjax.models.fusion.late import LateFusion
from mmjax.models.registry import Registry

FUSIONS: Registry[Fusion] = Registry("fusion", {
    "concat": ConcatFusion, "cross_attention": CrossAttentionFusion,
    "co_attention": CoAttentionFusion, "late": LateFusion, "bottleneck": BottleneckFusion,
})

__all__ = ["FUSIONS", "Fusion", "build", "fill_absent"]


def build(cfg: Mapping[str, Any], opts: layers.Options | None = None, **kwargs: Any
          ) -> Fusion | None:
    """The fusion module of ``config.model.fusion`` (None for ``kind="none"``)."""
    if cfg.get("kind", "none") == "none":
        return None
    return FUSIONS.build(cfg, "model.fusion", opts=opts or layers.Options(), **kwargs)
