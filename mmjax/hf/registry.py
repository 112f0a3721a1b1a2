"""The supported Hugging Face ``model_type``\\ s, and lookups by config or by module.

Adding an architecture is one module implementing ``common.Architecture`` plus its entry in
``ARCHITECTURES``; loading, saving and comparing find it here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from mmjax.hf import ast, bert, clip, resnet, video, vit, whisper
from mmjax.hf.common import Architecture, HFError
from mmjax.hf.table import Entry

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in (bert.ARCHITECTURE, vit.ARCHITECTURE, clip.ARCHITECTURE,
                              resnet.ARCHITECTURE, ast.ARCHITECTURE, whisper.ARCHITECTURE,
                              video.VIDEOMAE, video.VIVIT)
}
MODEL_TYPES = tuple(ARCHITECTURES)


def architecture(cfg: Mapping[str, Any]) -> Architecture:
    """The architecture of a config.json's ``model_type``."""
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFError(f"model_type={kind!r} is not supported; known: {MODEL_TYPES}")
    return ARCHITECTURES[kind]


def architecture_of(model: nn.Module) -> Architecture:
    """The architecture whose ``build`` made ``model``."""
    for arch in ARCHITECTURES.values():
        if isinstance(model, arch.wrapper):
            return arch
    raise HFError(f"no Hugging Face weight table for {type(model).__name__}")


def build(cfg: Mapping[str, Any], *, pooler: bool = True) -> nn.Module:
    """The mmjax module for a Hugging Face config (``pooler``: BERT/ViT pooling layer present)."""
    return architecture(cfg).build(cfg, json.dumps(cfg, sort_keys=True), pooler)


def table(model: nn.Module) -> list[Entry]:
    """The weight table of a module ``build`` made; mmjax paths start at the collection."""
    return architecture_of(model).table(model)


def image_size(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) the folder's position embeddings were made for (any for a ResNet)."""
    return architecture(cfg).image_size(cfg)
