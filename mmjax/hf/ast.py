"""AST (``model_type: audio-spectrogram-transformer``): an ASTModel as mmjax's ``AST`` tower.

Overlapping 16x16 patches with frequency and time strides, [CLS] and distillation tokens,
learnt positions, pre-LN blocks (ViT's tensor names), a final LayerNorm; ``pooler_output`` is
the mean of the two tokens. Audio-classification checkpoints (``audio_spectrogram_transformer.``
prefix) load too; their classifier head is not part of the tower and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax.hf import table as tb
from mmjax.hf.common import Architecture, HFError, activation, pair
from mmjax.hf.vit import LAYER
from mmjax.models.audio import AST


def ast_audio_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """AST options that reproduce an ASTModel."""
    ph, pw = pair(cfg.get("patch_size", 16))
    if ph != pw:
        raise HFError(f"config.json: patch_size={cfg['patch_size']} is not square")
    return {
        "width": cfg["hidden_size"], "depth": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"], "mlp_dim": cfg["intermediate_size"],
        "patch_size": ph, "frequency_stride": int(cfg.get("frequency_stride", 10)),
        "time_stride": int(cfg.get("time_stride", 10)), "pool": "cls_dist",
        "activation": activation(cfg, "config.json: "),
        "qkv_bias": bool(cfg.get("qkv_bias", True)),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    }


class HFAST(nn.Module):
    """ASTModel's interface (``input_values`` [B, frames, mels]) over mmjax's ``AST``."""

    audio: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, input_values: jax.Array) -> dict[str, Any]:
        out = AST(**self.audio, name="audio")(input_values)
        return {"last_hidden_state": out["tokens"], "pooler_output": out["pooled"]}


def ast_table(opts: Mapping[str, Any], prefix: str = "", mm: str = "audio") -> list[tb.Entry]:
    """ASTModel ↔ AST (paths below ``params``)."""
    e = f"{prefix}embeddings"
    t = [tb.Entry(f"{e}.cls_token", (mm, "cls"), tb.same, tb.same),
         tb.Entry(f"{e}.distillation_token", (mm, "dist"), tb.same, tb.same),
         tb.Entry(f"{e}.position_embeddings", (mm, "pos_embedding"), tb.same, tb.same)]
    t += tb.conv(f"{e}.patch_embeddings.projection", (mm, "embedding"), True)
    for i in range(opts["depth"]):
        t += tb.block(f"{prefix}encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), LAYER,
                      opts["num_heads"], opts["qkv_bias"])
    t += tb.norm(f"{prefix}layernorm", (mm, "encoder", "final_norm"))
    return t


class ASTArchitecture(Architecture):
    model_type = "audio-spectrogram-transformer"
    hf_class = "ASTModel"
    wrapper = HFAST
    prefix = "audio_spectrogram_transformer."
    tower = "audio"

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFAST:
        return HFAST(audio=ast_audio_options(cfg), hf_config=hf_config)

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return ast_audio_options(cfg)

    def tower_options(self, cfg: Mapping[str, Any], kind: str | None) -> tuple[str, dict]:
        if kind not in (None, "ast"):
            raise HFError(f"an AST folder loads into kind='ast', not {kind!r}")
        return self.tower, self.options(cfg)

    def table(self, model: HFAST) -> list[tb.Entry]:
        return tb.under(("params",), ast_table(model.audio))

    def select_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An audio-classification checkpoint's tower tensors (its ``classifier.*`` dropped)."""
        p = self.prefix
        if any(k.startswith(f"{p}embeddings.") for k in weights):
            return {k.removeprefix(p): v for k, v in weights.items() if k.startswith(p)}
        return weights

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        shape = (batch, int(cfg.get("max_length", 1024)), int(cfg.get("num_mel_bins", 128)))
        return {"input_values": rng.standard_normal(shape).astype(np.float32)}


ARCHITECTURE = ASTArchitecture()
