"""Video towers (``model_type: videomae`` and ``vivit``) as mmjax's ``ViViT`` (params under
``video/``), joint space-time attention.

Both take ``pixel_values`` ``[B, T, C, H, W]`` (transformers' layout) and return transformers'
output names. VideoMAE: tubelet embedding, fixed sinusoidal positions, pre-LN blocks whose key
projection has no bias (loaded as zeros, which softmax cancels; saving leaves it out) and whose
query and value biases are stored as ``q_bias`` and ``v_bias``, and a
final LayerNorm only when ``use_mean_pooling`` is off (``VideoMAEModel`` then applies it).
ViViT: a [CLS] token, learnt positions over all tokens, a final LayerNorm and the tanh pooler
on [CLS]. Task models' checkpoints (``videomae.``/``vivit.`` prefixes) load too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.hf import table as tb
from mmjax.hf.common import Architecture, HFError, activation, pair
from mmjax.hf.vit import LAYER as VIT_LAYER
from mmjax.models.video import ViViT


class HFVideo(nn.Module):
    """``VideoMAEModel`` / ``VivitModel``'s interface over mmjax's ``ViViT``."""

    video: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, Any]:
        x = jnp.transpose(pixel_values, (0, 1, 3, 4, 2))  # [B, T, C, H, W] -> [B, T, H, W, C]
        out = ViViT(**self.video, name="video")(x)
        res = {"last_hidden_state": out["tokens"]}
        if self.video.get("pooler"):
            res["pooler_output"] = out["pooled"]
        return res


class HFVideoMAE(HFVideo):
    """``VideoMAEModel``'s interface."""


class HFViViT(HFVideo):
    """``VivitModel``'s interface."""


def _common(cfg: Mapping[str, Any], patch: int, tubelet: int) -> dict[str, Any]:
    return {
        "patch_size": patch, "tubelet": tubelet, "width": cfg["hidden_size"],
        "depth": cfg["num_hidden_layers"], "num_heads": cfg["num_attention_heads"],
        "mlp_dim": cfg["intermediate_size"], "attention": "joint",
        "activation": activation(cfg, "config.json: "),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    }


def videomae_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    patch = pair(cfg.get("patch_size", 16))
    if patch[0] != patch[1]:
        raise HFError(f"config.json: patch_size={cfg['patch_size']} is not square")
    mean = bool(cfg.get("use_mean_pooling", True))
    return {**_common(cfg, patch[0], int(cfg.get("tubelet_size", 2))), "positions": "sincos",
            "class_token": False, "pool": "gap", "final_norm": not mean, "pooler": False,
            "qkv_bias": bool(cfg.get("qv_bias", cfg.get("qkv_bias", True)))}


def vivit_options(cfg: Mapping[str, Any], pooler: bool = True) -> dict[str, Any]:
    t, ph, pw = (int(v) for v in cfg.get("tubelet_size", (2, 16, 16)))
    if ph != pw:
        raise HFError(f"config.json: tubelet_size={cfg['tubelet_size']} is not square in space")
    if pooler and cfg.get("pooler_act", "tanh") != "tanh":
        raise HFError(f"config.json: pooler_act={cfg['pooler_act']!r}; only 'tanh' is supported")
    size = cfg.get("pooler_output_size") or cfg["hidden_size"]
    if pooler and size != cfg["hidden_size"]:
        raise HFError(f"config.json: pooler_output_size={size} differs from hidden_size="
                      f"{cfg['hidden_size']}; mmjax's pooler keeps the width")
    if cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) * \
            cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise HFError("config.json: head_dim x num_attention_heads differs from hidden_size")
    return {**_common(cfg, ph, t), "positions": "joint", "class_token": True, "pool": "cls",
            "final_norm": True, "pooler": pooler, "qkv_bias": bool(cfg.get("qkv_bias", True))}


def _inputs(cfg: Mapping[str, Any], rng: np.random.Generator, batch: int, size: tuple[int, int],
            frames: int) -> dict[str, np.ndarray]:
    h, w = size
    channels = int(cfg.get("num_channels", 3))
    return {"pixel_values": rng.standard_normal((batch, frames, channels, h, w)).astype(
        np.float32)}


def conv3d(hf: str, mm: tuple[str, ...]) -> list[tb.Entry]:
    """Conv3d weight [O, I, T, H, W] ↔ flax [T, H, W, I, O], and its bias."""
    return [tb.Entry(f"{hf}.weight", (*mm, "kernel"), lambda w: w.transpose(2, 3, 4, 1, 0),
                     lambda k: k.transpose(4, 3, 0, 1, 2)),
            tb.Entry(f"{hf}.bias", (*mm, "bias"), tb.same, tb.same)]


class VideoMAEArchitecture(Architecture):
    model_type = "videomae"
    hf_class = "VideoMAEModel"
    wrapper = HFVideoMAE
    prefix = "videomae."
    tower = "video"

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFVideo:
        return HFVideoMAE(video=videomae_options(cfg), hf_config=hf_config)

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return videomae_options(cfg)

    def table(self, model: HFVideo) -> list[tb.Entry]:
        o, mm = model.video, "video"
        t = conv3d("embeddings.patch_embeddings.projection", (mm, "embedding"))
        for i in range(o["depth"]):
            block = tb.block(f"encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), VIT_LAYER,
                             o["num_heads"], o["qkv_bias"])
            att = f"encoder.layer.{i}.attention.attention"
            rename = {f"{att}.query.bias": f"{att}.q_bias", f"{att}.value.bias": f"{att}.v_bias"}
            t += [tb.Entry(rename.get(e.hf, e.hf), e.mm, e.to_mm, e.to_hf) for e in block
                  if e.hf != f"{att}.key.bias"]
        if o["final_norm"]:
            t += tb.norm("layernorm", (mm, "encoder", "final_norm"))
        return tb.under(("params",), t)

    def implied(self, model: HFVideo) -> dict[tuple[str, ...], np.ndarray]:
        o = model.video
        if not o["qkv_bias"]:
            return {}
        bias = np.zeros((o["num_heads"], o["width"] // o["num_heads"]), np.float32)
        return {("params", "video", "encoder", f"layer_{i}", "attn", "key", "bias"): bias
                for i in range(o["depth"])}

    def image_size(self, cfg: Mapping[str, Any]) -> tuple[int, int]:
        return pair(cfg.get("image_size", 224))

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        return _inputs(cfg, rng, batch, self.image_size(cfg), int(cfg.get("num_frames", 16)))


class VivitArchitecture(Architecture):
    model_type = "vivit"
    hf_class = "VivitModel"
    wrapper = HFViViT
    prefix = "vivit."
    tower = "video"

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFVideo:
        return HFViViT(video=vivit_options(cfg, pooler), hf_config=hf_config)

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return vivit_options(cfg)

    def table(self, model: HFVideo) -> list[tb.Entry]:
        o, mm = model.video, "video"
        t = [tb.Entry("embeddings.cls_token", (mm, "cls"), tb.same, tb.same),
             tb.Entry("embeddings.position_embeddings", (mm, "pos_embedding"), tb.same,
                      tb.same)]
        t += conv3d("embeddings.patch_embeddings.projection", (mm, "embedding"))
        for i in range(o["depth"]):
            t += tb.block(f"encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), VIT_LAYER,
                          o["num_heads"], o["qkv_bias"])
        t += tb.norm("layernorm", (mm, "encoder", "final_norm"))
        if o["pooler"]:
            t += tb.linear("pooler.dense", (mm, "pooler"))
        return tb.under(("params",), t)

    def image_size(self, cfg: Mapping[str, Any]) -> tuple[int, int]:
        return pair(cfg.get("image_size", 224))

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        return _inputs(cfg, rng, batch, self.image_size(cfg), int(cfg.get("num_frames", 32)))

    def reference(self, out: Any, to_numpy: Any
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        names = ("last_hidden_state", "pooler_output")
        outputs = {n: to_numpy(getattr(out, n)) for n in names
                   if getattr(out, n, None) is not None}
        states = getattr(out, "hidden_states", None) or ()
        return outputs, {self.tower: [to_numpy(h) for h in states]}


VIDEOMAE = VideoMAEArchitecture()
VIVIT = VivitArchitecture()
