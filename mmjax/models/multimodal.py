"""MultimodalModel: encoders by modality name, fusion, task heads.

Parameters sit under ``image/…``, ``text/…`` (one subtree per modality, named after it),
``fusion/…`` and ``heads/<task>/…``, so a pretrained tower loads into its own subtree and a third
modality is one more entry in ``config.model.encoders``, not a rewrite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import fusion as fusion_lib
from mmjax.models import heads as heads_lib
from mmjax.models.resnet import ResNet
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

Array = jax.Array

ENCODERS: dict[str, type[nn.Module]] = {"vit": ViT, "resnet": ResNet, "text": TextEncoder}

# Config keys that describe a part but are not arguments of its module.
_NON_MODULE_KEYS = {"kind", "init_from", "loss", "target", "label_smoothing", "tokenizer"}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def module_kwargs(cls: type[nn.Module], cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``cfg`` that are fields of ``cls``; an unknown key is a config error."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    out = {}
    for key, value in cfg.items():
        if key in _NON_MODULE_KEYS:
            continue
        if key not in fields:
            raise ValueError(f"{where}.{key} is not an option of {cls.__name__}; "
                             f"known: {sorted(fields)}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def get_dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (model.dtype); known: {sorted(_DTYPES)}")
    return _DTYPES[name]


class MultimodalModel(nn.Module):
    """Encoders → fusion → heads; returns ``{task: head outputs}``.

    ``encoders``: modality → {"kind": "vit"|"resnet"|"text", **module options}; the batch holds the
    modality's input under the same name (an array, or a dict of keyword arguments such as
    ``{"ids", "mask"}`` for text). ``fusion``: {"kind": ... | "none", **options}; "none" makes a
    two-tower model whose heads read only the towers' pooled features. ``heads``: task →
    {"kind": "classification"|"regression"|"contrastive", **options}.

    ``dropout`` is the one rate of the whole model, ``dtype`` the compute dtype (params stay
    float32), ``bn_axis_name`` the pmap axis over which BatchNorm averages statistics.
    """

    encoders: Mapping[str, Mapping[str, Any]]
    fusion: Mapping[str, Any]
    heads: Mapping[str, Mapping[str, Any]]
    dropout: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    attn_implementation: str | None = None
    remat: str | None = None

    def _shared(self, cls: type[nn.Module]) -> dict[str, Any]:
        """Model-wide options passed to every part that has them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        shared = {
            "dropout": self.dropout,
            "dtype": self.dtype,
            "bn_axis_name": self.bn_axis_name,
            "attn_implementation": self.attn_implementation,
            "remat": self.remat,
        }
        return {k: v for k, v in shared.items() if k in fields}

    def encode(self, batch: Mapping[str, Any], *, train: bool = False) -> dict[str, dict]:
        """Runs each tower on its input: ``{modality: {"tokens", "pooled", "mask"}}``."""
        out = {}
        for modality, cfg in self.encoders.items():
            kind = cfg.get("kind")
            if kind not in ENCODERS:
                raise ValueError(f"model.{modality}.kind={kind!r}; "
                                 f"known: {sorted(ENCODERS)}")
            if modality not in batch:
                raise ValueError(f"the batch has no {modality!r} input for encoder {modality!r}; "
                                 f"batch keys: {sorted(batch)}")
            cls = ENCODERS[kind]
            kwargs = module_kwargs(cls, cfg, f"model.{modality}")
            encoder = cls(**{**self._shared(cls), **kwargs}, name=modality)
            x = batch[modality]
            out[modality] = encoder(**x, train=train) if isinstance(x, Mapping) else encoder(
                x, train=train
            )
        return out

    @nn.compact
    def __call__(self, batch: Mapping[str, Any], *, train: bool = False) -> dict[str, Any]:
        towers = self.encode(batch, train=train)
        features: dict[str, Any] = {m: f["pooled"] for m, f in towers.items()}
        kind = self.fusion.get("kind", "none")
        if kind != "none":
            cls = fusion_lib.Fusion
            kwargs = module_kwargs(cls, self.fusion, "model.fusion")
            features.update(cls(**{**self._shared(cls), **kwargs}, kind=kind, name="fusion")(
                towers, train=train
            ))
        return Heads(self.heads, self.dropout, self.dtype, name="heads")(features, train=train)


class Heads(nn.Module):
    """Container so that every head's parameters sit under ``heads/<task>/``."""

    specs: Mapping[str, Mapping[str, Any]]
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Any]:
        out = {}
        for task, cfg in self.specs.items():
            kind = cfg.get("kind")
            if kind not in heads_lib.HEADS:
                raise ValueError(f"model.heads.{task}.kind={kind!r}; "
                                 f"known: {sorted(heads_lib.HEADS)}")
            cls = heads_lib.HEADS[kind]
            kwargs = module_kwargs(cls, cfg, f"model.heads.{task}")
            fields = {f.name for f in dataclasses.fields(cls)}
            if "dropout" in fields:
                kwargs.setdefault("dropout", self.dropout)
            if isinstance(kwargs.get("dtype"), str):
                kwargs["dtype"] = get_dtype(kwargs["dtype"])
            kwargs.setdefault("dtype", self.dtype)
            out[task] = cls(**kwargs, name=task)(features, train=train)
        return out


MODEL_OPTIONS = ("fusion", "heads", "dropout", "dtype", "attn_implementation", "remat")


def build_model(model_cfg: Any, *, bn_axis_name: str | None = None) -> MultimodalModel:
    """MultimodalModel from ``config.model`` (a ConfigDict or plain mapping).

    Every key of ``config.model`` that is not one of ``MODEL_OPTIONS`` is a modality whose value
    configures its encoder (``config.model.image``, ``config.model.text``, ...).
    """
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    encoders = {}
    for key, value in cfg.items():
        if key in MODEL_OPTIONS:
            continue
        if not isinstance(value, Mapping) or value.get("kind") not in ENCODERS:
            raise ValueError(f"model.{key} is neither a model option {MODEL_OPTIONS} nor an "
                             f"encoder config with kind in {sorted(ENCODERS)}")
        encoders[key] = value
    if not encoders:
        raise ValueError("config.model has no encoder (e.g. model.image, model.text)")
    if "heads" not in cfg or not cfg["heads"]:
        raise ValueError("config.model.heads is empty: a model needs at least one task head")
    return MultimodalModel(
        encoders=encoders,
        fusion=cfg.get("fusion", {"kind": "none"}),
        heads=cfg["heads"],
        dropout=cfg.get("dropout", 0.0),
        dtype=get_dtype(cfg.get("dtype", "float32")),
        bn_axis_name=bn_axis_name,
        attn_implementation=cfg.get("attn_implementation") or None,
        remat=cfg.get("remat") or None,
    )


def loss_spec(head_cfg: Mapping[str, Any]) -> str:
    """The registered loss name of a head: its ``loss`` key, else its kind's default."""
    return head_cfg.get("loss") or heads_lib.DEFAULT_LOSS[head_cfg["kind"]]
