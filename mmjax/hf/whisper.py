"""Whisper (``model_type: whisper``): the ENCODER of a Whisper model as mmjax's
``WhisperEncoder`` tower; the text decoder is not loaded.

Any Whisper folder loads: ``WhisperModel`` (``encoder.*``), ``WhisperForConditionalGeneration``
(``model.encoder.*``), ``WhisperForAudioClassification`` (``encoder.*``) or an encoder-only
folder (bare names); tensors outside the encoder are left out. Two tensors have no one-to-one
counterpart: ``embed_positions.weight`` is Whisper's fixed sinusoids, which mmjax computes
(loading checks the folder's are those), and mmjax's attention has a key bias that Whisper's
``k_proj`` lacks (loaded as zeros; it cannot change the output, since softmax cancels a bias
shared by all keys, and saving leaves it out).

Saving writes an encoder-only folder (bare tensor names, ``architectures: ["WhisperEncoder"]``)
that ``transformers.models.whisper.modeling_whisper.WhisperEncoder.from_pretrained`` loads; a
full ``WhisperModel`` would need a decoder, which mmjax does not have.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax.hf import table as tb
from mmjax.hf.common import Architecture, HFError, Rows, activation, max_abs_diff
from mmjax.models.audio import WhisperEncoder, whisper_sinusoids

LAYER = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
         "out": "self_attn.out_proj", "attn_norm": "self_attn_layer_norm", "fc1": "fc1",
         "fc2": "fc2", "mlp_norm": "final_layer_norm"}
ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")  # ForConditionalGeneration, Model, bare


def whisper_audio_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """WhisperEncoder options that reproduce the encoder of a Whisper model."""
    act = {"hidden_act": cfg.get("activation_function", "gelu")}
    return {
        "width": cfg.get("d_model", 1280), "depth": cfg.get("encoder_layers", 32),
        "num_heads": cfg.get("encoder_attention_heads", 20),
        "mlp_dim": cfg.get("encoder_ffn_dim", 5120),
        "max_len": int(cfg.get("max_source_positions", 1500)), "pool": "mean",
        "activation": activation(act, "config.json: activation_function: "),
        "layer_norm_eps": 1e-5,
    }


class HFWhisperEncoder(nn.Module):
    """WhisperEncoder's interface (``input_features`` [B, mels, frames]) over mmjax's tower."""

    audio: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, input_features: jax.Array) -> dict[str, Any]:
        out = WhisperEncoder(**self.audio, name="audio")(input_features)
        return {"last_hidden_state": out["tokens"]}


def _conv1d(hf: str, mm: tb.Path) -> list[tb.Entry]:
    """Conv1d weight [out, in, k] ↔ flax kernel [k, in, out] (and the bias)."""
    flip = lambda w: w.transpose(2, 1, 0)
    return [tb.Entry(f"{hf}.weight", (*mm, "kernel"), flip, flip),
            tb.Entry(f"{hf}.bias", (*mm, "bias"), tb.same, tb.same)]


def whisper_table(opts: Mapping[str, Any], mm: str = "audio") -> list[tb.Entry]:
    """Whisper encoder (bare names) ↔ WhisperEncoder (paths below ``params``)."""
    t = _conv1d("conv1", (mm, "conv1")) + _conv1d("conv2", (mm, "conv2"))
    for i in range(opts["depth"]):
        block = tb.block(f"layers.{i}", (mm, "encoder", f"layer_{i}"), LAYER,
                         opts["num_heads"], True)
        t += [e for e in block if e.hf != f"layers.{i}.self_attn.k_proj.bias"]
    t += tb.norm("layer_norm", (mm, "encoder", "final_norm"))
    return t


class WhisperArchitecture(Architecture):
    model_type = "whisper"
    hf_class = "WhisperEncoder"
    wrapper = HFWhisperEncoder
    tower = "audio"
    captured = ("layer_", "final_norm")

    def build(self, cfg: Mapping[str, Any], hf_config: str,
              pooler: bool = True) -> HFWhisperEncoder:
        return HFWhisperEncoder(audio=whisper_audio_options(cfg), hf_config=hf_config)

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return whisper_audio_options(cfg)

    def tower_options(self, cfg: Mapping[str, Any], kind: str | None) -> tuple[str, dict]:
        if kind not in (None, "whisper"):
            raise HFError(f"a Whisper folder loads into kind='whisper', not {kind!r}")
        return self.tower, self.options(cfg)

    def table(self, model: HFWhisperEncoder) -> list[tb.Entry]:
        return tb.under(("params",), whisper_table(model.audio))

    def select_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The encoder's tensors under bare names; the decoder and any head are left out."""
        for p in ENCODER_PREFIXES:
            if f"{p}conv1.weight" in weights:
                return {k.removeprefix(p): v for k, v in weights.items() if k.startswith(p)}
        return weights

    def fixed(self, model: HFWhisperEncoder) -> dict[str, np.ndarray]:
        return {"embed_positions.weight": whisper_sinusoids(model.audio["max_len"],
                                                            model.audio["width"])}

    def implied(self, model: HFWhisperEncoder) -> dict[tuple[str, ...], np.ndarray]:
        o = model.audio
        bias = np.zeros((o["num_heads"], o["width"] // o["num_heads"]), np.float32)
        return {("params", "audio", "encoder", f"layer_{i}", "attn", "key", "bias"): bias
                for i in range(o["depth"])}

    def export_config(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {**cfg, "architectures": [self.hf_class]}  # the folder holds the encoder only

    def reference_model(self, path: Any) -> Any:
        """The folder's encoder: ``WhisperEncoder`` for an encoder-only folder, else
        ``AutoModel``'s (a ``WhisperModel``) ``get_encoder()``."""
        from transformers import AutoModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as TorchEncoder

        cfg = json.loads((Path(path) / "config.json").read_text())
        if self.hf_class in cfg.get("architectures", []):
            return TorchEncoder.from_pretrained(str(path), local_files_only=True)
        return AutoModel.from_pretrained(str(path), local_files_only=True,
                                         trust_remote_code=False).get_encoder()

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        frames = 2 * int(cfg.get("max_source_positions", 1500))  # what transformers demands
        shape = (batch, int(cfg.get("num_mel_bins", 80)), frames)
        return {"input_features": rng.standard_normal(shape).astype(np.float32)}

    def layer_rows(self, tower: str, captured: Mapping[str, Any],
                   states: list[np.ndarray]) -> Rows:
        """transformers' last hidden state is after the final LayerNorm (Whisper's own)."""
        enc = captured.get("encoder", {})
        last = len(states) - 2
        return [(f"{tower}/layer_{i}",
                 max_abs_diff(enc["final_norm" if i == last else f"layer_{i}"]["__call__"][0],
                              states[i + 1]))
                for i in range(last + 1)]


ARCHITECTURE = WhisperArchitecture()
