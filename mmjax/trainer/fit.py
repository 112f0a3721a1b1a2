"""Fit a model config to the modalities its data has: one tower per modality present.

A config such as ``configs/folder.py`` carries towers (``config.model.encoders``) for image, audio,
series and text; a dataset whose train records have only images and texts trains the image and text
towers, and the others are removed before the model is built (a tower with no input could not be
initialised). What the remaining parts need must be there: a fusion query, a head or an evaluator
that reads a modality the data lacks makes the run fail at once, naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import ml_collections

from mmjax import evaluators
from mmjax.models import fusion as fusion_lib
from mmjax.models import heads as heads_lib

log = logging.getLogger(__name__)


def towers(model_cfg: Any) -> list[str]:
    """The modalities of ``config.model.encoders``."""
    return list(model_cfg.get("encoders") or {})


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    return None


def _needs(config: Any) -> list[tuple[str, str]]:
    """``(what, modality)`` for every part that reads one named modality; ``what`` names the
    config key and its value."""
    model = config.model
    out = []
    fusion = fusion_lib.build(dict(model.get("fusion") or {}), parent=None)
    for key, m in (fusion.reads() if fusion is not None else {}).items():
        out.append((f"model.fusion.{key}={m!r}", m))
    for task, head in (model.get("heads") or {}).items():
        kind = head.get("kind")
        if kind not in heads_lib.HEADS:
            continue
        cls = heads_lib.HEADS.get(kind, f"model.heads.{task}")
        for key in ("modality", "modalities"):
            value = head.get(key, _default(cls, key))
            if value is None or value is dataclasses.MISSING:
                continue
            for m in [value] if isinstance(value, str) else list(value):
                out.append((f"model.heads.{task}.{key}={value!r}", m))
    for name, ev in (config.get("evals") or {}).items():
        for m in evaluators.get(ev.get("kind"), f"evals.{name}").reads:
            out.append((f"evals.{name}.kind={ev.get('kind')!r} (it reads {m})", m))
    return out


def fit_to_data(config: ml_collections.ConfigDict, present: Sequence[str]) -> list[str]:
    """Removes the towers of ``config.model`` whose modality the data lacks; returns their
    names. Raises naming the config key if a remaining part needs a removed modality, or if
    no tower is left."""
    model = config.model
    have = towers(model)
    absent = [m for m in have if m not in present]
    if not absent:
        return []
    left = [m for m in have if m in present]
    if not left:
        raise ValueError(f"the data has the modalities {tuple(present)} but config.model has "
                         f"towers only for {have}")
    for what, m in _needs(config):
        if m in absent:
            raise ValueError(f"{what} but the train records have no {m!r} (they have "
                             f"{tuple(present)}): change that key or add {m} data")
    fusion = model.get("fusion") or {}
    kind = fusion.get("kind", "none")
    if kind != "none" and len(left) < 2:
        raise ValueError(f"model.fusion.kind={kind!r} needs two or more modalities, the train "
                         f"records have only {left}: set --config.model.fusion.kind=none")
    with config.unlocked():
        for m in absent:
            del model.encoders[m]
    log.info("data has no %s: towers %s removed from the model", absent, absent)
    return absent
