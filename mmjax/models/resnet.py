"""ResNet image encoders (v1.5: stride on the 3x3 conv), sized by a variant string.

BatchNorm statistics are averaged across devices: under ``jax.pmap(axis_name="data")`` the
trainer sets ``bn_axis_name="data"`` so every replica normalises with the global batch's moments
(under the mesh path ``jax.jit`` sees the global batch and needs no axis name).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Options

Array = jax.Array

# block kind, blocks per stage, base width
_VARIANTS: dict[str, tuple[str, tuple[int, ...], int]] = {
    "mu": ("basic", (1, 1), 8),
    "18": ("basic", (2, 2, 2, 2), 64),
    "26": ("bottleneck", (2, 2, 2, 2), 64),
    "34": ("basic", (3, 4, 6, 3), 64),
    "50": ("bottleneck", (3, 4, 6, 3), 64),
    "101": ("bottleneck", (3, 4, 23, 3), 64),
    "152": ("bottleneck", (3, 8, 36, 3), 64),
}


class ConvBN(nn.Module):
    """Conv (symmetric torch-style padding, no bias) + BatchNorm + optional ReLU."""

    features: int
    kernel: int
    stride: int = 1
    relu: bool = True
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        pad = self.kernel // 2
        x = nn.Conv(
            self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype, name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            axis_name=self.bn_axis_name if train else None, name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
    features: int
    stride: int
    bottleneck: bool
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        conv = lambda f, k, s, name, relu=True: ConvBN(
            f, k, s, relu, self.bn_axis_name, self.dtype, name=name
        )
        out_features = self.features * (4 if self.bottleneck else 1)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_features:
            shortcut = conv(out_features, 1, self.stride, "shortcut", relu=False)(x, train=train)
        if self.bottleneck:
            h = conv(self.features, 1, 1, "conv1")(x, train=train)
            h = conv(self.features, 3, self.stride, "conv2")(h, train=train)
            h = conv(out_features, 1, 1, "conv3", relu=False)(h, train=train)
        else:
            h = conv(self.features, 3, self.stride, "conv1")(x, train=train)
            h = conv(out_features, 3, 1, "conv2", relu=False)(h, train=train)
        return nn.relu(h + shortcut)


class ResNet(nn.Module):
    """ResNet returning ``{"tokens": [B, h*w, C], "pooled": [B, C], "mask": None}``."""

    variant: str = "50"
    width: int | None = None
    stem: bool = True
    opts: Options = Options()

    def token_grid(self, input_shape: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
        """The final feature map, square for a square image."""
        side = round(num_tokens ** 0.5)
        return (side, side) if side * side == num_tokens else (1, num_tokens)

    @nn.compact
    def __call__(self, image: Array, *, train: bool = False) -> dict[str, Array | None]:
        if self.variant not in _VARIANTS:
            raise ValueError(f"unknown ResNet variant {self.variant!r}; known: {list(_VARIANTS)}")
        kind, stages, base = _VARIANTS[self.variant]
        base = self.width or base
        axis, dtype = self.opts.bn_axis_name, self.opts.dtype
        x = image.astype(dtype)
        if self.stem:
            x = ConvBN(base, 7, 2, True, axis, dtype, name="stem")(
                x, train=train
            )
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, blocks in enumerate(stages):
            for j in range(blocks):
                x = ResidualBlock(
                    base * 2**i,
                    stride=2 if (i > 0 and j == 0) else 1,
                    bottleneck=kind == "bottleneck",
                    bn_axis_name=axis,
                    dtype=dtype,
                    name=f"stage{i}_block{j}",
                )(x, train=train)
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        pooled = nn.Dropout(self.opts.dropout)(tokens.mean(axis=1), deterministic=not train)
        return {"tokens": tokens, "pooled": pooled, "mask": None}
