"""BERT (``model_type: bert``): a BertModel as mmjax's ``TextEncoder``.

Post-LN blocks, LayerNorm on the embeddings, learned absolute positions, token types, and the
tanh pooler on [CLS] when the checkpoint has one. Task models' checkpoints (``bert.`` prefix)
load too; their heads are not part of the mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax.hf import table as tb
from mmjax.hf.common import Architecture, HFError, activation, text_inputs
from mmjax.models.text import TextEncoder

LAYER = {"query": "attention.self.query", "key": "attention.self.key",
         "value": "attention.self.value", "out": "attention.output.dense",
         "attn_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
         "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}


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
        "activation": activation(cfg, "config.json: "), "qkv_bias": True,
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    }


class HFBert(nn.Module):
    """BertModel's interface over mmjax's ``TextEncoder`` (params under ``text/``)."""

    text: Mapping[str, Any]
    hf_config: str = ""  # the folder's config.json, kept so that export writes it back verbatim

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        out = TextEncoder(**self.text, name="text")(input_ids, attention_mask, token_type_ids)
        res = {"last_hidden_state": out["tokens"]}
        if self.text.get("pooler"):
            res["pooler_output"] = out["pooled"]
        return res


def bert_table(opts: Mapping[str, Any], prefix: str = "", mm: str = "text") -> list[tb.Entry]:
    """BertModel ↔ TextEncoder (paths below ``params``)."""
    e = f"{prefix}embeddings"
    t = [tb.Entry(f"{e}.word_embeddings.weight", (mm, "token_embedding", "embedding"),
                  tb.same, tb.same),
         tb.Entry(f"{e}.position_embeddings.weight", (mm, "position_embedding"),
                  tb.same, tb.same)]
    if opts["type_vocab_size"]:
        t.append(tb.Entry(f"{e}.token_type_embeddings.weight",
                          (mm, "segment_embedding", "embedding"), tb.same, tb.same))
    t += tb.norm(f"{e}.LayerNorm", (mm, "embed_norm"))
    for i in range(opts["depth"]):
        t += tb.block(f"{prefix}encoder.layer.{i}", (mm, "encoder", f"layer_{i}"), LAYER,
                      opts["num_heads"], True)
    if opts["pooler"]:
        t += tb.linear(f"{prefix}pooler.dense", (mm, "pooler"))
    return t


class BertArchitecture(Architecture):
    model_type = "bert"
    hf_class = "BertModel"
    wrapper = HFBert
    prefix = "bert."
    tower = "text"

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFBert:
        return HFBert(text=bert_text_options(cfg, pooler), hf_config=hf_config)

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return bert_text_options(cfg)

    def table(self, model: HFBert) -> list[tb.Entry]:
        return tb.under(("params",), bert_table(model.text))

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        length = min(length, cfg.get("max_position_embeddings", 512))
        out = text_inputs(rng, batch, length, cfg.get("vocab_size", 49408))
        types = cfg.get("type_vocab_size", 2)
        out["token_type_ids"] = rng.integers(0, max(types, 1), (batch, length)).astype(np.int32)
        return out


ARCHITECTURE = BertArchitecture()
