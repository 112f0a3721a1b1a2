"""Audio towers built from the shared transformer layers: an AST and a Whisper encoder.

- ``AST`` (``kind: "ast"``): the Audio Spectrogram Transformer, a ViT over a log-mel
  spectrogram ``[B, frames, mels]`` whose 16x16 patches overlap (separate frequency and time
  strides), with a [CLS] and a distillation token, learnt positions, pre-LN blocks and a final
  LayerNorm; pooled = the mean of the two tokens (transformers' ``ASTModel.pooler_output``).
- ``WhisperEncoder`` (``kind: "whisper"``): Whisper's audio encoder on ``[B, mels, frames]``
  (transformers' layout): two 3-wide conv1d + GELU (the second with stride 2), Whisper's fixed
  sinusoidal positions, pre-LN blocks, a final LayerNorm; pooled = the mean of the tokens.

Both return ``{"tokens", "pooled", "mask": None}`` like every tower and take the model-wide
``opts`` (dtype, dropout, remat, scan), so a pretrained tower (``mmjax.hf.ast``/``whisper``)
trains inside ``MultimodalModel`` like the image and text towers.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers

Array = jax.Array


def _sizes(variant: str, **overrides: int | None) -> dict[str, int]:
    size = layers.tower_sizes(variant, **overrides)
    size.pop("patch_size", None)
    return size


class AST(nn.Module):
    """Audio Spectrogram Transformer on ``[B, frames, mels]`` log-mel features.

    Sizes come from ``variant`` ("mu", "B", ...; ``width``/``depth``/``mlp_dim``/``num_heads``
    override). A ``patch_size``² kernel slides with ``frequency_stride`` over mels and
    ``time_stride`` over frames; the position embeddings (one per patch, plus the two tokens) are
    made at init for the input's shape, so every batch must have that shape. ``pool``:
    ``"cls_dist"`` (mean of the [CLS] and distillation tokens, AST's) or ``"gap"`` (mean of the
    patch tokens).
    """

    variant: str = "mu"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    pool: str = "cls_dist"
    activation: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pos_embedding_std: float = 0.02  # AST's; larger makes positions count from the first step
    opts: layers.Options = layers.Options()

    def prefix_tokens(self) -> int:
        return 2  # [CLS] and the distillation token

    def token_grid(self, input_shape: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
        """The patch grid is mels-major: rows are mel bands (low first), columns frames."""
        frames, mels = input_shape
        rows = (mels - self.patch_size) // self.frequency_stride + 1
        return rows, (frames - self.patch_size) // self.time_stride + 1

    def pool_rows(self, features: Array, num_tokens: int) -> Array:
        b = features.shape[0]
        if self.pool == "gap":
            return layers.pool_mean(b, num_tokens, 2)
        return (layers.pool_one_hot(b, num_tokens, 0) + layers.pool_one_hot(b, num_tokens, 1)) / 2

    def display(self, input_map: np.ndarray) -> np.ndarray:
        """An input-shaped [frames, mels] map as drawn: [mels, frames]."""
        return input_map.T

    @nn.compact
    def __call__(self, features: Array, *, train: bool = False) -> dict[str, Array | None]:
        s = _sizes(self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                   num_heads=self.num_heads)
        p, dtype = self.patch_size, self.opts.dtype
        if features.ndim != 3 or min(features.shape[1:]) < p:
            raise ValueError(f"AST takes [batch, frames, mels] features with at least {p} frames "
                             f"and mels (the patch size), got {features.shape}")
        # transformers transposes to [B, 1, mels, frames]: the patch grid is mels-major.
        x = jnp.swapaxes(features, 1, 2)[..., None].astype(dtype)
        x = nn.Conv(s["width"], (p, p), strides=(self.frequency_stride, self.time_stride),
                    padding="VALID", dtype=dtype, name="embedding")(x)
        b, _, _, d = x.shape
        x = x.reshape(b, -1, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
        dist = self.param("dist", nn.initializers.zeros, (1, 1, d), jnp.float32)
        tokens = [jnp.broadcast_to(t.astype(x.dtype), (b, 1, d)) for t in (cls, dist)]
        x = jnp.concatenate([*tokens, x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=self.pos_embedding_std),
                         (1, x.shape[1], d), jnp.float32)
        if pos.shape[1] != x.shape[1]:
            raise ValueError(f"AST position embeddings cover {pos.shape[1] - 2} patches, the "
                             f"features {features.shape[1:]} give {x.shape[1] - 2}")
        x = nn.Dropout(self.opts.dropout)(x + pos.astype(x.dtype), deterministic=not train)
        x = layers.Encoder(
            depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"], pre_norm=True,
            final_norm=True, activation=self.activation, qkv_bias=self.qkv_bias,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name="encoder",
        )(x, train=train)
        if self.pool == "cls_dist":
            pooled = (x[:, 0] + x[:, 1]) / 2
        elif self.pool == "gap":
            pooled = x[:, 2:].mean(axis=1)
        else:
            raise ValueError(f"unknown AST pool {self.pool!r}; use cls_dist or gap")
        return {"tokens": x, "pooled": pooled, "mask": None}


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed positions ``[length, channels]``: [sin | cos] of position * timescales.

    The timescales and angles are rounded to float32 as Whisper's torch code rounds them, so the
    table matches the one checkpoints store to a few float32 ulps of the angle
    (docs/pretrained.md).
    """
    if channels % 2 or channels < 4:
        raise ValueError(f"Whisper positions need an even width >= 4, got {channels}")
    step = np.float32(-math.log(max_timescale) / (channels // 2 - 1))
    exponent = step * np.arange(channels // 2, dtype=np.float32)  # a float32 product, as torch
    inv = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angle = (np.arange(length, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder on ``[B, mels, frames]`` (transformers' ``input_features``).

    The stem maps T frames to ⌈T/2⌉ tokens; the tokens get the first ⌈T/2⌉ fixed sinusoidal
    positions (no parameters), so shorter clips than Whisper's 30 s (3000 frames) work, up to
    ``max_len`` tokens. ``pool``: ``"mean"`` of the tokens, or ``"first"``.
    """

    variant: str = "mu"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    max_len: int = 1500
    pool: str = "mean"
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    opts: layers.Options = layers.Options()

    def pool_rows(self, features: Array, num_tokens: int) -> Array:
        b = features.shape[0]
        if self.pool == "first":
            return layers.pool_one_hot(b, num_tokens, 0)
        return layers.pool_mean(b, num_tokens)

    @nn.compact
    def __call__(self, features: Array, *, train: bool = False) -> dict[str, Array | None]:
        s = _sizes(self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                   num_heads=self.num_heads)
        d, dtype = s["width"], self.opts.dtype
        if features.ndim != 3:
            raise ValueError(f"WhisperEncoder takes [batch, mels, frames], got {features.shape}")
        gelu = layers.get_activation("gelu", self.opts)  # the stem's GELU is always exact
        x = jnp.swapaxes(features, 1, 2).astype(dtype)
        x = gelu(nn.Conv(d, (3,), padding=[(1, 1)], dtype=dtype, name="conv1")(x))
        x = gelu(nn.Conv(d, (3,), strides=(2,), padding=[(1, 1)], dtype=dtype,
                         name="conv2")(x))
        if x.shape[1] > self.max_len:
            raise ValueError(f"{features.shape[2]} frames give {x.shape[1]} tokens, more than "
                             f"max_len={self.max_len} positions")
        pos = jnp.asarray(whisper_sinusoids(x.shape[1], d))
        x = nn.Dropout(self.opts.dropout)(x + pos.astype(x.dtype), deterministic=not train)
        x = layers.Encoder(
            depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"], pre_norm=True,
            final_norm=True, activation=self.activation, qkv_bias=True,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name="encoder",
        )(x, train=train)
        if self.pool == "mean":
            pooled = x.mean(axis=1)
        elif self.pool == "first":
            pooled = x[:, 0]
        else:
            raise ValueError(f"unknown WhisperEncoder pool {self.pool!r}; use mean or first")
        return {"tokens": x, "pooled": pooled, "mask": None}
