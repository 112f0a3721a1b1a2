"""Hugging Face BERT, ViT and CLIP folders loaded into mmjax's own encoders, and written back.

The towers are the trainer's modules (``TextEncoder``, ``ViT``) with the options Hugging Face
needs, wrapped only to rename outputs to Hugging Face's names; there is no parallel copy of an
encoder here. The weight mapping is an explicit table per family (HF name → mmjax path plus a
pair of exact, inverse transforms: Linear kernels transposed, conv OIHW↔HWIO, q/k/v split into
[D, heads, head_dim]), so every tensor is accounted for in both directions and a missing,
unexpected or mis-shaped tensor is reported by name. Local folders only: nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import resnet as resnet_lib
from mmjax.models.resnet import ResNet
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

Array = jax.Array
MODEL_TYPES = ("bert", "vit", "clip", "resnet")

# Hugging Face activation names → mmjax's (layers.ACTIVATIONS).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_ACTIVATIONS_BACK = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
                     "relu": "relu", "silu": "silu"}
# Non-persistent buffers that older checkpoints still contain; they are not weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids", "num_batches_tracked")


class HFError(ValueError):
    """A Hugging Face folder that cannot be loaded; the message names the file or tensor."""


# ----------------------------------------------------------------------------------- modules


def crop_to_patches(pixels: Array, image: Mapping[str, Any]) -> Array:
    """Drops the bottom/right pixels that no whole patch covers, as PyTorch's strided conv does.

    mmjax's ViT refuses such sizes (silently ignoring pixels is a training bug), but a Hugging
    Face config may name one, and equivalence means ignoring the same pixels.
    """
    p = image["patch_size"]
    h, w = pixels.shape[1] // p * p, pixels.shape[2] // p * p
    return pixels[:, :h, :w]


class HFBert(nn.Module):
    """BertModel's interface over mmjax's ``TextEncoder`` (params under ``text/``)."""

    text: Mapping[str, Any]
    hf_config: str = ""  # the folder's config.json, kept so that export writes it back verbatim

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
    ) -> dict[str, Array]:
        out = TextEncoder(**self.text, name="text")(input_ids, attention_mask, token_type_ids)
        res = {"last_hidden_state": out["tokens"]}
        if self.text.get("pooler"):
            res["pooler_output"] = out["pooled"]
        return res


class HFViT(nn.Module):
    """ViTModel's interface (NHWC pixels) over mmjax's ``ViT`` (params under ``image/``)."""

    image: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, pixel_values: Array) -> dict[str, Array]:
        out = ViT(**self.image, name="image")(crop_to_patches(pixel_values, self.image))
        res = {"last_hidden_state": out["tokens"]}
        if self.image.get("pooler"):
            res["pooler_output"] = out["pooled"]
        return res


class HFCLIP(nn.Module):
    """CLIPModel: mmjax's ``ViT`` + ``TextEncoder`` + two bias-free projections + logit scale."""

    text: Mapping[str, Any]
    image: Mapping[str, Any]
    projection_dim: int
    logit_scale_init: float = 2.6592
    hf_config: str = ""

    @nn.compact
    def __call__(
        self, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None
    ) -> dict[str, Array]:
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


class HFResNet(nn.Module):
    """ResNetModel's interface over mmjax's ``ResNet`` (params and batch_stats under ``image/``).

    ``last_hidden_state`` is NHWC ``[B, h, w, C]`` (Hugging Face's is NCHW), ``pooler_output``
    ``[B, C]`` (Hugging Face's is ``[B, C, 1, 1]``).
    """

    image: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, pixel_values: Array) -> dict[str, Array]:
        out = ResNet(**self.image, name="image")(pixel_values, train=False)
        h, w = pixel_values.shape[1:3]
        for k, st, p in [(7, 2, 3), (3, 2, 1)] + [(3, 2, 1)] * (self._stages() - 1):
            h, w = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        tokens = out["tokens"]
        return {"last_hidden_state": tokens.reshape(tokens.shape[0], h, w, -1),
                "pooler_output": out["pooled"]}

    def _stages(self) -> int:
        return len(resnet_lib._VARIANTS[self.image["variant"]][1])


# ------------------------------------------------------------- config.json → encoder options


def _activation(cfg: Mapping[str, Any], where: str) -> str:
    act = cfg.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise HFError(f"{where}hidden_act={act!r} has no mmjax equivalent; known: "
                      f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))


def bert_text_options(cfg: Mapping[str, Any], pooler: bool = True) -> dict[str, Any]:
    """TextEncoder options that reproduce a BertModel (post-LN, embedding LN, [CLS] pooler)."""
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise HFError(f"config.json: position_embedding_type="
                      f"{cfg['position_embedding_type']!r}; only 'absolute' is supported")
    return {
        "vocab_size": cfg["vocab_size"], "width": cfg["hidden_size"],
        "depth": cfg["num_hidden_layers"], "num_heads": cfg["num_attention_heads"],
        "mlp_dim": cfg["intermediate_size"], "max_len": cfg["max_position_embeddings"],
        "type_vocab_size": cfg.get("type_vocab_size", 2), "pre_norm": False, "embed_norm": True,
        "final_norm": False, "causal": False, "pool": "cls", "pooler": pooler,
        "activation": _activation(cfg, "config.json: "), "qkv_bias": True,
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    }


def vit_image_options(cfg: Mapping[str, Any], pooler: bool = True) -> dict[str, Any]:
    """ViT options that reproduce a ViTModel (class token, final LN, tanh pooler on [CLS])."""
    ph, pw = _pair(cfg.get("patch_size", 16))
    if ph != pw:
        raise HFError(f"config.json: patch_size={cfg['patch_size']} is not square")
    if pooler and cfg.get("pooler_act", "tanh") != "tanh":
        raise HFError(f"config.json: pooler_act={cfg['pooler_act']!r}; only 'tanh' is supported")
    return {
        "patch_size": ph, "width": cfg["hidden_size"], "depth": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"], "mlp_dim": cfg["intermediate_size"],
        "class_token": True, "pool": "cls", "embed_norm": False, "final_norm": True,
        "pool_norm": False, "pooler": pooler, "activation": _activation(cfg, "config.json: "),
        "qkv_bias": bool(cfg.get("qkv_bias", True)),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    }


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
        "activation": _activation({"hidden_act": tc.get("hidden_act", "quick_gelu")},
                                  "config.json: text_config."),
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
        "activation": _activation({"hidden_act": vc.get("hidden_act", "quick_gelu")},
                                  "config.json: vision_config."),
        "qkv_bias": True, "layer_norm_eps": float(vc.get("layer_norm_eps", 1e-5)),
    }


def resnet_image_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ResNet options for a ResNetModel; it must be one of the family's variants, widened.

    mmjax's ResNet sizes come from a variant (blocks per stage) and a base width that doubles
    per stage, so a Hugging Face ResNet with other depths or widths has no equivalent.
    """
    kind = cfg.get("layer_type", "bottleneck")
    depths = tuple(cfg.get("depths", (3, 4, 6, 3)))
    base = int(cfg.get("embedding_size", 64))
    hidden = list(cfg.get("hidden_sizes", (256, 512, 1024, 2048)))
    for flag in ("downsample_in_first_stage", "downsample_in_bottleneck"):
        if cfg.get(flag):
            raise HFError(f"config.json: {flag}=true has no mmjax equivalent")
    if cfg.get("hidden_act", "relu") != "relu":
        raise HFError(f"config.json: hidden_act={cfg['hidden_act']!r}; ResNet uses relu")
    names = [v for v, (k, d, _) in resnet_lib._VARIANTS.items() if k == kind and d == depths]
    want = [base * 2**i * (4 if kind == "bottleneck" else 1) for i in range(len(depths))]
    if not names or hidden != want:
        raise HFError(f"config.json: layer_type={kind!r}, depths={list(depths)}, "
                      f"hidden_sizes={hidden} match no mmjax ResNet variant (blocks per stage "
                      f"{[d for _, d, _ in resnet_lib._VARIANTS.values()]}, widths {want})")
    return {"variant": names[0], "width": base}


def image_size(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) the folder's position embeddings were made for (any for a ResNet)."""
    if cfg.get("model_type") == "resnet":
        return (40, 56)
    vc = cfg.get("vision_config", {}) if cfg.get("model_type") == "clip" else cfg
    return _pair(vc.get("image_size", 224))


def read_config(path: str | Path) -> dict[str, Any]:
    """The folder's config.json; an unsupported ``model_type`` is an error naming the file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFError(f"{file}: not found (a Hugging Face folder needs config.json)")
    cfg = json.loads(file.read_text())
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise HFError(f"{file}: model_type={kind!r} is not supported; known: {MODEL_TYPES}")
    return cfg


def build(cfg: Mapping[str, Any], *, pooler: bool = True) -> nn.Module:
    """The mmjax module for a Hugging Face config (``pooler``: BERT/ViT pooling layer present)."""
    text = json.dumps(cfg, sort_keys=True)
    kind = cfg.get("model_type")
    if kind == "bert":
        return HFBert(text=bert_text_options(cfg, pooler), hf_config=text)
    if kind == "vit":
        return HFViT(image=vit_image_options(cfg, pooler), hf_config=text)
    if kind == "clip":
        return HFCLIP(
            text=clip_text_options(cfg.get("text_config", {})),
            image=clip_vision_options(cfg.get("vision_config", {})),
            projection_dim=cfg.get("projection_dim", 512),
            logit_scale_init=float(cfg.get("logit_scale_init_value", 2.6592)),
            hf_config=text,
        )
    if kind == "resnet":
        return HFResNet(image=resnet_image_options(cfg), hf_config=text)
    raise HFError(f"model_type={kind!r} is not supported; known: {MODEL_TYPES}")


def dummy_inputs(cfg: Mapping[str, Any], batch: int = 1) -> dict[str, np.ndarray]:
    """Inputs of the right shapes for ``init`` (values do not matter)."""
    kind = cfg["model_type"]
    out: dict[str, np.ndarray] = {}
    if kind in ("bert", "clip"):
        out["input_ids"] = np.ones((batch, 4), np.int32)
        out["attention_mask"] = np.ones((batch, 4), np.int32)
    if kind in ("vit", "clip"):
        h, w = image_size(cfg)
        channels = (cfg.get("vision_config", {}) if kind == "clip" else cfg).get("num_channels", 3)
        out["pixel_values"] = np.zeros((batch, h, w, channels), np.float32)
    if kind == "resnet":
        out["pixel_values"] = np.zeros((batch, 32, 32, cfg.get("num_channels", 3)), np.float32)
    return out


# ------------------------------------------------------------------------ the weight tables


@dataclass(frozen=True)
class Entry:
    """One HF tensor ↔ one mmjax parameter; ``to_mm``/``to_hf`` are exact inverses."""

    hf: str
    mm: tuple[str, ...]
    to_mm: Callable[[Any], Any]
    to_hf: Callable[[Any], Any]


_same = lambda x: x
_T = lambda x: x.T


def _linear(hf: str, mm: tuple[str, ...], bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", (*mm, "kernel"), _T, _T)]
    if bias:
        out.append(Entry(f"{hf}.bias", (*mm, "bias"), _same, _same))
    return out


def _norm(hf: str, mm: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{hf}.weight", (*mm, "scale"), _same, _same),
            Entry(f"{hf}.bias", (*mm, "bias"), _same, _same)]


def _heads_in(hf: str, mm: tuple[str, ...], heads: int, bias: bool) -> list[Entry]:
    """q/k/v Linear [H*hd, D] → DenseGeneral kernel [D, H, hd] (and bias [H, hd])."""
    out = [Entry(
        f"{hf}.weight", (*mm, "kernel"),
        lambda w: w.T.reshape(w.shape[1], heads, w.shape[0] // heads),
        lambda k: k.reshape(k.shape[0], -1).T,
    )]
    if bias:
        out.append(Entry(f"{hf}.bias", (*mm, "bias"), lambda b: b.reshape(heads, -1),
                         lambda b: b.reshape(-1)))
    return out


def _heads_out(hf: str, mm: tuple[str, ...], heads: int) -> list[Entry]:
    """Output Linear [D, H*hd] → DenseGeneral kernel [H, hd, D]."""
    return [
        Entry(f"{hf}.weight", (*mm, "kernel"),
              lambda w: w.T.reshape(heads, w.shape[1] // heads, w.shape[0]),
              lambda k: k.reshape(-1, k.shape[-1]).T),
        Entry(f"{hf}.bias", (*mm, "bias"), _same, _same),
    ]


def _block(hf: str, mm: tuple[str, ...], names: Mapping[str, str], heads: int,
           qkv_bias: bool) -> list[Entry]:
    """One transformer layer; ``names`` gives each sublayer's HF name relative to ``hf``."""
    out: list[Entry] = []
    for part in ("query", "key", "value"):
        out += _heads_in(f"{hf}.{names[part]}", (*mm, "attn", part), heads, qkv_bias)
    out += _heads_out(f"{hf}.{names['out']}", (*mm, "attn", "out"), heads)
    out += _norm(f"{hf}.{names['attn_norm']}", (*mm, "attn_norm"))
    out += _linear(f"{hf}.{names['fc1']}", (*mm, "mlp", "fc1"))
    out += _linear(f"{hf}.{names['fc2']}", (*mm, "mlp", "fc2"))
    out += _norm(f"{hf}.{names['mlp_norm']}", (*mm, "mlp_norm"))
    return out


_BERT_LAYER = {"query": "attention.self.query", "key": "attention.self.key",
               "value": "attention.self.value", "out": "attention.output.dense",
               "attn_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
               "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}
_VIT_LAYER = {"query": "attention.attention.query", "key": "attention.attention.key",
              "value": "attention.attention.value", "out": "attention.output.dense",
              "attn_norm": "layernorm_before", "fc1": "intermediate.dense",
              "fc2": "output.dense", "mlp_norm": "layernorm_after"}
_CLIP_LAYER = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
               "value": "self_attn.v_proj", "out": "self_attn.out_proj",
               "attn_norm": "layer_norm1", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
               "mlp_norm": "layer_norm2"}


def _conv(hf: str, mm: tuple[str, ...], bias: bool) -> list[Entry]:
    """Conv2d weight OIHW ↔ flax HWIO."""
    out = [Entry(f"{hf}.weight", (*mm, "kernel"), lambda w: w.transpose(2, 3, 1, 0),
                 lambda k: k.transpose(3, 2, 0, 1))]
    if bias:
        out.append(Entry(f"{hf}.bias", (*mm, "bias"), _same, _same))
    return out


def bert_table(opts: Mapping[str, Any], prefix: str = "", mm: str = "text") -> list[Entry]:
    """BertModel ↔ TextEncoder."""
    e = f"{prefix}embeddings"
    t = [Entry(f"{e}.word_embeddings.weight", (mm, "token_embedding", "embedding"), _same, _same),
         Entry(f"{e}.position_embeddings.weight", (mm, "position_embedding"), _same, _same)]
    if opts["type_vocab_size"]:
        t.append(Entry(f"{e}.token_type_embeddings.weight",
                       (mm, "segment_embedding", "embedding"), _same, _same))
    t += _norm(f"{e}.LayerNorm", (mm, "embed_norm"))
    for i in range(opts["depth"]):
        t += _block(f"{prefix}encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), _BERT_LAYER,
                    opts["num_heads"], True)
    if opts["pooler"]:
        t += _linear(f"{prefix}pooler.dense", (mm, "pooler"))
    return t


def vit_table(opts: Mapping[str, Any], prefix: str = "", mm: str = "image") -> list[Entry]:
    """ViTModel ↔ ViT."""
    e = f"{prefix}embeddings"
    t = [Entry(f"{e}.cls_token", (mm, "cls"), _same, _same),
         Entry(f"{e}.position_embeddings", (mm, "pos_embedding"), _same, _same)]
    t += _conv(f"{e}.patch_embeddings.projection", (mm, "embedding"), True)
    for i in range(opts["depth"]):
        t += _block(f"{prefix}encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), _VIT_LAYER,
                    opts["num_heads"], opts["qkv_bias"])
    t += _norm(f"{prefix}layernorm", (mm, "encoder", "final_norm"))
    if opts["pooler"]:
        t += _linear(f"{prefix}pooler.dense", (mm, "pooler"))
    return t


def clip_table(text: Mapping[str, Any], image: Mapping[str, Any]) -> list[Entry]:
    """CLIPModel ↔ HFCLIP (text tower, vision tower, projections, logit scale)."""
    e = "text_model.embeddings"
    t = [Entry(f"{e}.token_embedding.weight", ("text", "token_embedding", "embedding"),
               _same, _same),
         Entry(f"{e}.position_embedding.weight", ("text", "position_embedding"), _same, _same)]
    for i in range(text["depth"]):
        t += _block(f"text_model.encoder.layers.{i}", ("text", "encoder", f"layer_{i}"),
                    _CLIP_LAYER, text["num_heads"], True)
    t += _norm("text_model.final_layer_norm", ("text", "encoder", "final_norm"))
    e = "vision_model.embeddings"
    t += [Entry(f"{e}.class_embedding", ("image", "cls"), lambda c: c.reshape(1, 1, -1),
                lambda c: c.reshape(-1)),
          Entry(f"{e}.position_embedding.weight", ("image", "pos_embedding"),
                lambda p: p[None], lambda p: p[0])]
    t += _conv(f"{e}.patch_embedding", ("image", "embedding"), False)
    t += _norm("vision_model.pre_layrnorm", ("image", "embed_norm"))
    for i in range(image["depth"]):
        t += _block(f"vision_model.encoder.layers.{i}", ("image", "encoder", f"layer_{i}"),
                    _CLIP_LAYER, image["num_heads"], True)
    t += _norm("vision_model.post_layernorm", ("image", "pool_norm"))
    t += _linear("text_projection", ("text_projection",), bias=False)
    t += _linear("visual_projection", ("visual_projection",), bias=False)
    t.append(Entry("logit_scale", ("logit_scale",), _same, _same))
    return t


def _conv_bn(hf: str, mm: tuple[str, ...]) -> list[Entry]:
    """A bias-free conv and its BatchNorm (running statistics go to ``batch_stats``)."""
    out = [Entry(e.hf, ("params", *e.mm), e.to_mm, e.to_hf)
           for e in _conv(f"{hf}.convolution", (*mm, "conv"), False)]
    n = f"{hf}.normalization"
    out += [Entry(f"{n}.weight", ("params", *mm, "bn", "scale"), _same, _same),
            Entry(f"{n}.bias", ("params", *mm, "bn", "bias"), _same, _same),
            Entry(f"{n}.running_mean", ("batch_stats", *mm, "bn", "mean"), _same, _same),
            Entry(f"{n}.running_var", ("batch_stats", *mm, "bn", "var"), _same, _same)]
    return out


def resnet_table(opts: Mapping[str, Any], mm: str = "image") -> list[Entry]:
    """ResNetModel ↔ ResNet (v1.5, stride on the 3x3 conv; full variable paths)."""
    kind, stages, _ = resnet_lib._VARIANTS[opts["variant"]]
    t = _conv_bn("embedder.embedder", (mm, "stem"))
    names = ("conv1", "conv2", "conv3") if kind == "bottleneck" else ("conv1", "conv2")
    in_w = opts["width"]
    for i, blocks in enumerate(stages):
        out_w = opts["width"] * 2**i * (4 if kind == "bottleneck" else 1)
        for j in range(blocks):
            hf, block = f"encoder.stages.{i}.layers.{j}", (mm, f"stage{i}_block{j}")
            if (i > 0 and j == 0) or in_w != out_w:
                t += _conv_bn(f"{hf}.shortcut", (*block, "shortcut"))
            for k, name in enumerate(names):
                t += _conv_bn(f"{hf}.layer.{k}", (*block, name))
            in_w = out_w
    return t


def table(model: nn.Module) -> list[Entry]:
    """The weight table of one of this module's wrappers; mmjax paths start at the collection."""
    if isinstance(model, HFResNet):
        return resnet_table(model.image)
    if isinstance(model, HFBert):
        t = bert_table(model.text)
    elif isinstance(model, HFViT):
        t = vit_table(model.image)
    elif isinstance(model, HFCLIP):
        t = clip_table(model.text, model.image)
    else:
        raise HFError(f"no Hugging Face weight table for {type(model).__name__}")
    return [Entry(e.hf, ("params", *e.mm), e.to_mm, e.to_hf) for e in t]


# ----------------------------------------------------------------------------- load / save


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """``model.safetensors`` (preferred) or ``pytorch_model.bin`` as float32 numpy arrays."""
    path = Path(path)
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors.numpy import load_file

        raw = load_file(str(st))
    elif (path / "pytorch_model.bin").is_file():
        import torch  # only needed for the legacy format

        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raw = {k: v.float().numpy() for k, v in sd.items()}
    else:
        raise HFError(f"{path}: neither model.safetensors nor pytorch_model.bin found "
                      "(sharded checkpoints are not supported)")
    return {k: np.asarray(v, np.float32) for k, v in raw.items() if not k.endswith(_BUFFERS)}


def _strip_prefix(weights: dict[str, np.ndarray], kind: str) -> tuple[dict[str, np.ndarray], str]:
    """Drops the ``bert.``/``vit.`` base-model prefix that task models' checkpoints carry."""
    p = f"{kind}."
    if kind in ("bert", "vit") and any(k.startswith(f"{p}embeddings.") for k in weights):
        return {k[len(p):] if k.startswith(p) else k: v for k, v in weights.items()}, p
    return weights, ""


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out += _paths(v, (*prefix, k))
        else:
            out.append((*prefix, k))
    return out


def variables_from_hf(
    model: nn.Module, weights: Mapping[str, np.ndarray], where: str = ""
) -> dict[str, Any]:
    """Maps Hugging Face tensors onto ``model``'s variables, checking names and shapes."""
    cfg = json.loads(model.hf_config)
    expected = jax.eval_shape(model.init, jax.random.key(0), **dummy_inputs(cfg))
    entries = table(model)
    names = {e.hf for e in entries}
    for e in entries:
        if e.hf not in weights:
            raise HFError(f"{where}missing weight {e.hf!r} (mmjax {'/'.join(e.mm)})")
    for name in weights:
        if name not in names:
            raise HFError(f"{where}unexpected weight {name!r} (no mmjax parameter takes it)")
    covered = {e.mm for e in entries}
    for p in _paths(expected):
        if p not in covered:
            raise HFError(f"mmjax parameter {'/'.join(p)} has no Hugging Face source")
    params: dict[str, Any] = {}
    for e in entries:
        want = _get(expected, e.mm).shape
        want_hf = jax.eval_shape(e.to_hf, jax.ShapeDtypeStruct(want, jnp.float32)).shape
        got = weights[e.hf]
        if tuple(got.shape) != tuple(want_hf):
            raise HFError(f"{where}weight {e.hf!r} has shape {tuple(got.shape)}, the config "
                          f"implies {tuple(want_hf)} (mmjax {'/'.join(e.mm)})")
        _set(params, e.mm, jnp.asarray(e.to_mm(got), jnp.float32))
    return params


def load(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model, variables) for a local Hugging Face BERT, ViT or CLIP folder.

    ``model.apply(variables, **inputs)`` returns Hugging Face's output names; images are NHWC.
    """
    cfg = read_config(path)
    weights, _ = _strip_prefix(read_weights(path), cfg["model_type"])
    pooler = any(k.startswith("pooler.") for k in weights)
    model = build(cfg, pooler=pooler)
    return model, variables_from_hf(model, weights, f"{path}: ")


def state_dict(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """mmjax variables → Hugging Face tensors (exact: transposes and reshapes only)."""
    out = {}
    for e in table(model):
        try:
            value = _get(variables, e.mm)
        except KeyError as err:
            raise HFError(f"params have no {'/'.join(e.mm)} (for {e.hf!r})") from err
        out[e.hf] = np.ascontiguousarray(np.asarray(e.to_hf(np.asarray(value)), np.float32))
    return out


_ARCH = {"bert": "BertModel", "vit": "ViTModel", "clip": "CLIPModel", "resnet": "ResNetModel"}


def save(model: nn.Module, variables: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers`` loads as-is."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(model.hf_config)
    cfg.setdefault("architectures", [_ARCH[cfg["model_type"]]])
    save_file(state_dict(model, variables), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


# ------------------------------------------------------------------------------- tokenizer


class HFTokenizer:
    """``transformers.AutoTokenizer`` behind mmjax's tokenizer interface (see WordTokenizer)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 ``[N, max_len]``: padded to and truncated at ``max_len``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        if not len(texts):
            return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=max_len, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer saved in a local Hugging Face folder (offline)."""
    return HFTokenizer(path)


# --------------------------------------------------------------------------------- compare


def random_inputs(cfg: Mapping[str, Any], batch: int = 2, length: int = 7,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh random inputs; text rows after the first are right-padded to different lengths."""
    rng = np.random.default_rng(seed)
    kind = cfg["model_type"]
    out: dict[str, np.ndarray] = {}
    if kind in ("bert", "clip"):
        tc = cfg.get("text_config", {}) if kind == "clip" else cfg
        vocab = tc.get("vocab_size", 49408)
        length = min(length, tc.get("max_position_embeddings", 77 if kind == "clip" else 512))
        ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
        lengths = np.maximum(length - 2 * np.arange(batch), 1)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        eos = tc.get("eos_token_id", 49407)
        if kind == "clip" and 0 <= eos < vocab and eos != 2:
            ids[np.arange(batch), lengths - 1] = eos
        out["input_ids"] = ids
        out["attention_mask"] = mask
        if kind == "bert":
            types = cfg.get("type_vocab_size", 2)
            out["token_type_ids"] = rng.integers(0, max(types, 1), (batch, length)).astype(
                np.int32)
    if kind in ("vit", "clip", "resnet"):
        h, w = image_size(cfg)
        vc = cfg.get("vision_config", {}) if kind == "clip" else cfg
        c = vc.get("num_channels", 3)
        out["pixel_values"] = rng.standard_normal((batch, h, w, c)).astype(np.float32)
    return out


def _torch_outputs(path: str | Path, inputs: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Hugging Face outputs and per-layer hidden states: ({name: array}, {tower: [states]})."""
    import torch
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    tin = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if "pixel_values" in tin:
        tin["pixel_values"] = tin["pixel_values"].permute(0, 3, 1, 2)
    with torch.no_grad():
        out = hf(**tin, output_hidden_states=True)
    np_ = lambda t: t.detach().float().numpy()
    kind = hf.config.model_type
    if kind == "clip":
        names = ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text")
        states = {"text": [np_(h) for h in out.text_model_output.hidden_states],
                  "image": [np_(h) for h in out.vision_model_output.hidden_states]}
    elif kind == "resnet":  # NCHW → NHWC, and the pooled [B, C, 1, 1] → [B, C]
        states = {"image": [np_(h).transpose(0, 2, 3, 1) for h in out.hidden_states]}
        return {"last_hidden_state": np_(out.last_hidden_state).transpose(0, 2, 3, 1),
                "pooler_output": np_(out.pooler_output)[:, :, 0, 0]}, states
    else:
        names = ("last_hidden_state", "pooler_output")
        states = {"text" if kind == "bert" else "image": [np_(h) for h in out.hidden_states]}
    return {n: np_(getattr(out, n)) for n in names if getattr(out, n, None) is not None}, states


def compare(
    path: str | Path,
    model: nn.Module | None = None,
    variables: Mapping[str, Any] | None = None,
    *,
    batch: int = 2,
    seed: int = 0,
) -> list[tuple[str, float]]:
    """Max |mmjax - transformers| per layer and per output, on fresh random inputs.

    Rows ``<tower>/embeddings`` (where both expose it) and ``<tower>/layer_<i>`` compare each
    layer's output, so a divergence shows where it starts; the output rows are Hugging Face's.
    """
    if model is None or variables is None:
        model, variables = load(path)
    cfg = json.loads(model.hf_config)
    inputs = random_inputs(cfg, batch=batch, seed=seed)
    ref, ref_states = _torch_outputs(path, inputs)

    def keep(mdl: nn.Module, method: str) -> bool:
        return method == "__call__" and (
            (mdl.name or "").startswith(("layer_", "stage")) or mdl.name == "embed_norm")

    out, state = model.apply(variables, **inputs, capture_intermediates=keep)
    inter = state["intermediates"]
    rows: list[tuple[str, float]] = []
    for tower, hs in ref_states.items():
        sub = inter.get(tower, {})
        if "embed_norm" in sub:
            rows.append((f"{tower}/embeddings",
                         float(np.abs(np.asarray(sub["embed_norm"]["__call__"][0]) - hs[0]).max())))
        if isinstance(model, HFResNet):  # one row per stage: its last block's output
            blocks = sorted(sub)
            for i in range(len(hs) - 1):
                last = [b for b in blocks if b.startswith(f"stage{i}_")][-1]
                got = np.asarray(sub[last]["__call__"][0])
                rows.append((f"image/stage{i}", float(np.abs(got - hs[i + 1]).max())))
            continue
        enc = sub.get("encoder", {})
        for i in range(len(hs) - 1):
            got = np.asarray(enc[f"layer_{i}"]["__call__"][0])
            rows.append((f"{tower}/layer_{i}", float(np.abs(got - hs[i + 1]).max())))
    for name, value in ref.items():
        if name == "pooler_output" and name not in out:
            continue  # the folder has no pooler: transformers' is freshly random, not a reference
        if name not in out:
            raise HFError(f"mmjax output lacks {name!r}")
        rows.append((name, float(np.abs(np.asarray(out[name]) - value).max())))
    return rows


def format_table(rows: Sequence[tuple[str, float]]) -> str:
    width = max(len(n) for n, _ in rows)
    lines = [f"{'tensor':<{width}}  max_abs_diff"]
    lines += [f"{n:<{width}}  {d:.3e}" for n, d in rows]
    return "\n".join(lines)
