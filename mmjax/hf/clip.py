"""CLIP (``model_type: clip``): a CLIPModel as mmjax's ``TextEncoder`` + ``ViT``.

The text tower is causal and pre-LN with a final LayerNorm and end-of-text pooling; the vision
tower has bias-free patches, a LayerNorm on the embeddings and one on [CLS]. Two bias-free
projections and the learned logit scale complete the model. Either tower can also start a
training run's tower (``transfer.py`` uses the option functions here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import modalities
from mmjax.hf import table as tb
from mmjax.hf.common import (
    Architecture,
    HFError,
    activation,
    pair,
    pixel_inputs,
    text_inputs,
)
from mmjax.hf.vit import crop_to_patches
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

LAYER = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
         "out": "self_attn.out_proj", "attn_norm": "layer_norm1", "fc1": "mlp.fc1",
         "fc2": "mlp.fc2", "mlp_norm": "layer_norm2"}
OUTPUTS = ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text")


def clip_text_options(tc: Mapping[str, Any]) -> dict[str, Any]:
    """TextEncoder options for CLIP's text tower: pre-LN, causal, final LN, end-of-text pooling.

    Hugging Face pools at the largest id when ``eos_token_id == 2`` (old checkpoints) and at the
    first ``eos_token_id`` otherwise; both are pooling modes of the one TextEncoder.
    """
    eos = int(tc.get("eos_token_id", 49407))
    return {
        "vocab_size": tc.get("vocab_size", 49408), "width": tc.get("hidden_size", 512),
        "depth": tc.get("num_hidden_layers", 12), "num_heads": tc.get("num_attention_heads", 8),
        "mlp_dim": tc.get("intermediate_size", 2048),
        "max_len": tc.get("max_position_embeddings", 77), "type_vocab_size": 0,
        "pre_norm": True, "embed_norm": False, "final_norm": True, "causal": True,
        "pool": "argmax" if eos == 2 else "eos", "eos_token_id": eos, "pooler": False,
        "activation": activation(tc, "config.json: text_config.", "quick_gelu"),
        "qkv_bias": True, "layer_norm_eps": float(tc.get("layer_norm_eps", 1e-5)),
    }


def clip_vision_options(vc: Mapping[str, Any]) -> dict[str, Any]:
    """ViT options for CLIP's vision tower: bias-free patches, pre-LN on embeddings, LN on [CLS]."""
    return {
        "patch_size": int(vc.get("patch_size", 32)), "width": vc.get("hidden_size", 768),
        "depth": vc.get("num_hidden_layers", 12), "num_heads": vc.get("num_attention_heads", 12),
        "mlp_dim": vc.get("intermediate_size", 3072), "class_token": True, "pool": "cls",
        "embed_norm": True, "final_norm": False, "pool_norm": True, "pooler": False,
        "patch_bias": False,
        "activation": activation(vc, "config.json: vision_config.", "quick_gelu"),
        "qkv_bias": True, "layer_norm_eps": float(vc.get("layer_norm_eps", 1e-5)),
    }


class HFCLIP(nn.Module):
    """CLIPModel: mmjax's ``ViT`` + ``TextEncoder`` + two bias-free projections + logit scale."""

    text: Mapping[str, Any]
    image: Mapping[str, Any]
    projection_dim: int
    logit_scale_init: float = 2.6592
    hf_config: str = ""

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, pixel_values: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        t = TextEncoder(**self.text, name="text")(input_ids, attention_mask)["pooled"]
        v = ViT(**self.image, name="image")(crop_to_patches(pixel_values, self.image))["pooled"]
        proj = lambda name: nn.Dense(self.projection_dim, use_bias=False, name=name)
        t = proj("text_projection")(t)
        v = proj("visual_projection")(v)
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
        logits_per_text = jnp.exp(scale) * t @ v.T
        return {
            "text_embeds": t,
            "image_embeds": v,
            "logits_per_text": logits_per_text,
            "logits_per_image": logits_per_text.T,
        }


def clip_table(text: Mapping[str, Any], image: Mapping[str, Any]) -> list[tb.Entry]:
    """CLIPModel ↔ HFCLIP (text tower, vision tower, projections, logit scale)."""
    same = tb.same
    e = "text_model.embeddings"
    t = [tb.Entry(f"{e}.token_embedding.weight", ("text", "token_embedding", "embedding"),
                  same, same),
         tb.Entry(f"{e}.position_embedding.weight", ("text", "position_embedding"), same, same)]
    for i in range(text["depth"]):
        t += tb.block(f"text_model.encoder.layers.{i}", ("text", "encoder", f"layer_{i}"),
                      LAYER, text["num_heads"], True)
    t += tb.norm("text_model.final_layer_norm", ("text", "encoder", "final_norm"))
    e = "vision_model.embeddings"
    t += [tb.Entry(f"{e}.class_embedding", ("image", "cls"), lambda c: c.reshape(1, 1, -1),
                   lambda c: c.reshape(-1)),
          tb.Entry(f"{e}.position_embedding.weight", ("image", "pos_embedding"),
                   lambda p: p[None], lambda p: p[0])]
    t += tb.conv(f"{e}.patch_embedding", ("image", "embedding"), False)
    t += tb.norm("vision_model.pre_layrnorm", ("image", "embed_norm"))
    for i in range(image["depth"]):
        t += tb.block(f"vision_model.encoder.layers.{i}", ("image", "encoder", f"layer_{i}"),
                      LAYER, image["num_heads"], True)
    t += tb.norm("vision_model.post_layernorm", ("image", "pool_norm"))
    t += tb.linear("text_projection", ("text_projection",), bias=False)
    t += tb.linear("visual_projection", ("visual_projection",), bias=False)
    t.append(tb.Entry("logit_scale", ("logit_scale",), same, same))
    return t


class CLIPArchitecture(Architecture):
    model_type = "clip"
    hf_class = "CLIPModel"
    wrapper = HFCLIP

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFCLIP:
        return HFCLIP(
            text=clip_text_options(cfg.get("text_config", {})),
            image=clip_vision_options(cfg.get("vision_config", {})),
            projection_dim=cfg.get("projection_dim", 512),
            logit_scale_init=float(cfg.get("logit_scale_init_value", 2.6592)),
            hf_config=hf_config,
        )

    def tower_options(self, cfg: Mapping[str, Any], kind: str | None) -> tuple[str, dict]:
        if kind == "resnet":
            raise HFError("Hugging Face clip towers load into kind='vit', not resnet")
        if modalities.of_tower(kind) == "image":
            return "image", clip_vision_options(cfg.get("vision_config", {}))
        return "text", clip_text_options(cfg.get("text_config", {}))

    def table(self, model: HFCLIP) -> list[tb.Entry]:
        return tb.under(("params",), clip_table(model.text, model.image))

    def image_size(self, cfg: Mapping[str, Any]) -> tuple[int, int]:
        return pair(cfg.get("vision_config", {}).get("image_size", 224))

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        tc = cfg.get("text_config", {})
        vocab = tc.get("vocab_size", 49408)
        eos = tc.get("eos_token_id", 49407)
        out = text_inputs(rng, batch, min(length, tc.get("max_position_embeddings", 77)), vocab,
                          eos if 0 <= eos < vocab and eos != 2 else None)
        channels = cfg.get("vision_config", {}).get("num_channels", 3)
        return {**out, **pixel_inputs(rng, batch, self.image_size(cfg), channels)}

    def reference(self, out: Any, to_numpy: Callable[[Any], np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        states = {"text": [to_numpy(h) for h in out.text_model_output.hidden_states],
                  "image": [to_numpy(h) for h in out.vision_model_output.hidden_states]}
        outputs = {n: to_numpy(getattr(out, n)) for n in OUTPUTS
                   if getattr(out, n, None) is not None}
        return outputs, states


ARCHITECTURE = CLIPArchitecture()
