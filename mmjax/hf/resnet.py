"""ResNet (``model_type: resnet``): a ResNetModel as mmjax's ``ResNet`` (v1.5, inference).

Only configs that are one of mmjax's variants (blocks per stage) with a base width doubling per
stage map; BatchNorm running statistics go to ``batch_stats``. Outputs are NHWC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax.hf import table as tb
from mmjax.hf.common import Architecture, HFError, Rows, max_abs_diff, pixel_inputs
from mmjax.models import resnet as resnet_lib
from mmjax.models.resnet import ResNet


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


class HFResNet(nn.Module):
    """ResNetModel's interface over mmjax's ``ResNet`` (params and batch_stats under ``image/``).

    ``last_hidden_state`` is NHWC ``[B, h, w, C]`` (Hugging Face's is NCHW), ``pooler_output``
    ``[B, C]`` (Hugging Face's is ``[B, C, 1, 1]``).
    """

    image: Mapping[str, Any]
    hf_config: str = ""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, Any]:
        out = ResNet(**self.image, name="image")(pixel_values, train=False)
        h, w = pixel_values.shape[1:3]
        for k, st, p in [(7, 2, 3), (3, 2, 1)] + [(3, 2, 1)] * (self._stages() - 1):
            h, w = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        tokens: Any = out["tokens"]
        return {"last_hidden_state": tokens.reshape(tokens.shape[0], h, w, -1),
                "pooler_output": out["pooled"]}

    def _stages(self) -> int:
        return len(resnet_lib._VARIANTS[self.image["variant"]][1])


def _conv_bn(hf: str, mm: tb.Path) -> list[tb.Entry]:
    """A bias-free conv and its BatchNorm (running statistics go to ``batch_stats``)."""
    same = tb.same
    out = tb.under(("params",), tb.conv(f"{hf}.convolution", (*mm, "conv"), False))
    n = f"{hf}.normalization"
    out += [tb.Entry(f"{n}.weight", ("params", *mm, "bn", "scale"), same, same),
            tb.Entry(f"{n}.bias", ("params", *mm, "bn", "bias"), same, same),
            tb.Entry(f"{n}.running_mean", ("batch_stats", *mm, "bn", "mean"), same, same),
            tb.Entry(f"{n}.running_var", ("batch_stats", *mm, "bn", "var"), same, same)]
    return out


def resnet_table(opts: Mapping[str, Any], mm: str = "image") -> list[tb.Entry]:
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


class ResNetArchitecture(Architecture):
    model_type = "resnet"
    hf_class = "ResNetModel"
    wrapper = HFResNet
    tower = "image"
    captured = ("stage",)

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> HFResNet:
        return HFResNet(image=resnet_image_options(cfg), hf_config=hf_config)

    def tower_options(self, cfg: Mapping[str, Any], kind: str | None) -> tuple[str, dict]:
        raise HFError("ResNet towers cannot start from Hugging Face yet (their BatchNorm "
                      "statistics live outside params); use mmjax.hf.load")

    def table(self, model: HFResNet) -> list[tb.Entry]:
        return resnet_table(model.image)

    def image_size(self, cfg: Mapping[str, Any]) -> tuple[int, int]:
        return (40, 56)  # any size suits a ResNet; random inputs use this one

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        return pixel_inputs(rng, batch, self.image_size(cfg), cfg.get("num_channels", 3))

    def reference(self, out: Any, to_numpy: Callable[[Any], np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        """NCHW → NHWC, and the pooled ``[B, C, 1, 1]`` → ``[B, C]``."""
        nhwc = lambda t: to_numpy(t).transpose(0, 2, 3, 1)
        outputs = {"last_hidden_state": nhwc(out.last_hidden_state),
                   "pooler_output": to_numpy(out.pooler_output)[:, :, 0, 0]}
        return outputs, {"image": [nhwc(h) for h in out.hidden_states]}

    def layer_rows(self, tower: str, captured: Mapping[str, Any],
                   states: list[np.ndarray]) -> Rows:
        """One row per stage: its last block's output against HF's hidden state of the stage."""
        rows = []
        for i in range(len(states) - 1):
            blocks = [b for b in captured if b.startswith(f"stage{i}_block")]
            last = max(blocks, key=lambda b: int(b.rpartition("block")[2]))
            rows.append((f"{tower}/stage{i}",
                         max_abs_diff(captured[last]["__call__"][0], states[i + 1])))
        return rows


ARCHITECTURE = ResNetArchitecture()
