"""ViT (``model_type: vit``): a ViTModel as mmjax's ``ViT``.

Class token, learned positions, pre-LN blocks, a final LayerNorm and the tanh pooler on [CLS]
when the checkpoint has one. Task models' checkpoints (``vit.`` prefix) load too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax.hf import table as tb
from mmjax.hf.common import Architecture, HFError, activation, pair, pixel_inputs
from mmjax.models.vit import ViT

LAYER = {"query": "attention.attention.query", "key": "attention.attention.key",
         "value": "attention.attention.value", "out": "attention.output.dense",
         "attn_norm": "layernorm_before", "fc1": "intermediate.dense",
         "fc2": "output.dense", "mlp_norm": "layernorm_after"}


def crop_to_patches(pixels: jax.Array, image: Mapping[str, Any]) -> jax.Array:
    """Drops the bottom/right pixels that no whole patch covers, as PyTorch's strided conv does.

    mmjax's ViT refuses such sizes (silently ignoring pixels is a training bug), but a Hugging
    Face config may name one, and equivalence means ignoring the same pixels.
    """
    p = image["patch_size"]
    h, w = pixels.shape[1] // p * p, pixels.shape[2] // p * p
    return pixels[:, :h, :w]


def vit_image_options(cfg: Mapping[str, Any], pooler: bool = True) -> dict[str, Any]:
    """ViT options that reproduce a ViTModel (class token, final LN, tanh pooler on [CLS])."""
    ph, pw = pair(cfg.get("patch_size", 16))
    if ph != pw:
        raise HFError(f"config.json: patch_size={cfg['patch_size']} is not square")
    if pooler and cfg.get("pooler_act", "tanh") != "tanh":
        raise HFError(f"config.json: pooler_act={cfg['pooler_act']!r}; only 'tanh' is supported")
    return {
        "patch_size": ph, "width": cfg["hidden_size"], "depth": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"], "mlp_dim": cfg["intermediate_size"],
        "class_token": True, "pool": "cls", "embed_norm": False, "final_norm": True,
        "pool_norm": False, "pooler": pooler, "activation": activation(cfg, "config.json: "),
        "qkv_bias": bool(cfg.get("qkv_bias", True)),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    }


class HFViT(nn.Module):
    """ViTModel's interface (NHWC pixels) over mmjax's ``ViT`` (params under ``image/``)."""

    image: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, Any]:
        out = ViT(**self.image, name="image")(crop_to_patches(pixel_values, self.image))
        res = {"last_hidden_state": out["tokens"]}
        if self.image.get("pooler"):
            res["pooler_output"] = out["pooled"]
        return res


def vit_table(opts: Mapping[str, Any], prefix: str = "", mm: str = "image") -> list[tb.Entry]:
    """ViTModel ↔ ViT (paths below ``params``)."""
    e = f"{prefix}embeddings"
    t = [tb.Entry(f"{e}.cls_token", (mm, "cls"), tb.same, tb.same),
         tb.Entry(f"{e}.position_embeddings", (mm, "pos_embedding"), tb.same, tb.same)]
    t += tb.conv(f"{e}.patch_embeddings.projection", (mm, "embedding"), True)
    for i in range(opts["depth"]):
        t += tb.block(f"{prefix}encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), LAYER,
                      opts["num_heads"], opts["qkv_bias"])
    t += tb.norm(f"{prefix}layernorm", (mm, "encoder", "final_norm"))
    if opts["pooler"]:
        t += tb.linear(f"{prefix}pooler.dense", (mm, "pooler"))
    return t


class ViTArchitecture(Architecture):
    model_type = "vit"
    hf_class = "ViTModel"
    wrapper = HFViT
    prefix = "vit."
    tower = "image"

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFViT:
        return HFViT(image=vit_image_options(cfg, pooler), hf_config=hf_config)

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return vit_image_options(cfg)

    def tower_options(self, cfg: Mapping[str, Any], kind: str | None) -> tuple[str, dict]:
        """The image tower, also for a video tower (``kind="vivit"``): its patch kernel is
        inflated into a tubelet kernel when loaded (``mmjax.trainer.transfer``)."""
        if kind != "vivit":
            return super().tower_options(cfg, kind)
        opts = vit_image_options(cfg)
        if opts.pop("embed_norm") or opts.pop("pool_norm") or not opts.pop("patch_bias", True):
            raise HFError("this ViT's layout (embedding or pooling norm) has no video tower")
        return self.tower, opts

    def table(self, model: HFViT) -> list[tb.Entry]:
        return tb.under(("params",), vit_table(model.image))

    def image_size(self, cfg: Mapping[str, Any]) -> tuple[int, int]:
        return pair(cfg.get("image_size", 224))

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        return pixel_inputs(rng, batch, self.image_size(cfg), cfg.get("num_channels", 3))


ARCHITECTURE = ViTArchitecture()
