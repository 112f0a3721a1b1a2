"""ViViT video encoder (Arnab et al. 2021): tubelet embedding, then joint space-time attention
or the factorised encoder (a spatial transformer per time step, then a temporal one).

The blocks are mmjax's one transformer (``layers.Encoder``). Parameters are named as the image
``ViT``'s (``embedding``, ``pos_embedding``, ``encoder``), so an image ViT starts a video tower:
``inflate`` turns its patch kernel ``[p, p, C, D]`` into a tubelet kernel ``[t, p, p, C, D]``
(the central frame, or the mean over frames, as the ViViT paper does) and the rest is reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers
from mmjax.models.flops import dense_flops, layer_flops

Array = jax.Array

ATTENTION = ("joint", "factorised")
POSITIONS = ("factorised", "joint", "sincos")


def sincos_positions(n: int, d: int) -> np.ndarray:
    """float32 ``[n, d]`` sinusoidal positions in VideoMAE's layout (sines in even columns,
    cosines in odd ones, frequencies 10000^(-2i/d))."""
    pos = np.arange(n, dtype=np.float64)[:, None]
    angle = pos / np.power(10000.0, 2 * (np.arange(d) // 2) / d)[None]
    out = np.empty((n, d))
    out[:, 0::2], out[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    return out.astype(np.float32)


def inflate(kernel: Any, tubelet: int, how: str = "central") -> np.ndarray:
    """An image patch kernel ``[p, p, C, D]`` as a tubelet kernel ``[t, p, p, C, D]``:
    ``"central"`` puts it on the central frame (zeros elsewhere: the tower starts out as the
    image model on that frame), ``"mean"`` repeats it divided by ``t`` (a static clip gives
    the image model's embedding)."""
    k = np.asarray(kernel)
    if how == "central":
        out = np.zeros((tubelet, *k.shape), k.dtype)
        out[tubelet // 2] = k
        return out
    if how == "mean":
        return np.repeat(k[None] / tubelet, tubelet, axis=0).astype(k.dtype)
    raise ValueError(f"inflate: how={how!r}; expected 'central' or 'mean'")


def inflate_params(image_params: Mapping[str, Any], tubelet: int, how: str = "central"
                   ) -> dict[str, Any]:
    """An image ViT's params as a ViViT's (``positions="factorised"``): the patch kernel
    inflated, everything else as it is (the temporal positions start from the new tower's
    initialisation)."""
    out = jax.tree.map(np.asarray, dict(image_params))
    emb = dict(out["embedding"])
    emb["kernel"] = inflate(emb["kernel"], tubelet, how)
    out["embedding"] = emb
    return out


class ViViT(nn.Module):
    """Video ``[B, T, H, W, C]`` → ``{"tokens": [B, N, D], "pooled": [B, D], "mask": None}``.

    Tokens are tubelets of ``tubelet`` frames x ``patch_size``² pixels, in (time, row, column)
    order. ``attention="joint"``: all tubelets attend to each other (depth ``depth``);
    ``"factorised"``: each time step's tubelets go through ``depth`` spatial layers, are
    averaged, and the ``T / tubelet`` results go through ``temporal_depth`` temporal layers
    (the output tokens are then one per time step).

    Positions: ``"factorised"`` (a spatial table as the image ViT's plus a temporal one; the
    layout ``inflate_params`` fills), ``"joint"`` (one learnt table over all tokens, HF ViViT),
    ``"sincos"`` (fixed sinusoids, HF VideoMAE). Pooling: ``"gap"`` or ``"cls"``.

    ``stem`` > 0 puts that many 3x3 stride-2 convolutions (GELU) on each frame before the
    tubelet embedding, which then covers ``patch_size / 2**stem`` of their pixels: the token
    grid is unchanged, and what a token says about a shape depends less on where the shape
    sits in its patch (Xiao et al. 2021, early convolutions). Such towers start from scratch:
    an image ViT has no stem to inflate.
    """

    variant: str = "mu/8"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    tubelet: int = 2
    stem: int = 0
    attention: str = "joint"
    temporal_depth: int = 1
    positions: str = "factorised"
    class_token: bool = False
    pool: str = "gap"
    final_norm: bool = True
    pooler: bool = False
    activation: str = "gelu"
    qkv_bias: bool = True
    pos_embedding_std: float = 0.02
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()

    def sizes(self) -> dict[str, int]:
        size = layers.tower_sizes(self.variant, width=self.width, depth=self.depth,
                                  mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                                  patch_size=self.patch_size)
        if "patch_size" not in size:
            raise ValueError(f"ViViT variant {self.variant!r} names no patch size (e.g. 'B/16')")
        return size

    def _grid(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        p = self.sizes()["patch_size"]
        return input_shape[0] // self.tubelet, input_shape[1] // p, input_shape[2] // p

    # --- what the explainers and the benchmark ask (mmjax.models.encoders) ---------------------

    def prefix_tokens(self) -> int:
        return int(self.class_token)

    def token_grid(self, input_shape: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
        """(time steps x rows, columns): the per-tubelet maps stacked top to bottom, for a clip
        ``[T, H, W, C]`` or its frames stacked ``[T*H, W, C]`` (what explanations draw)."""
        n = num_tokens - self.prefix_tokens()
        if self.attention == "factorised":
            return n, 1
        cols = input_shape[-2] // self.sizes()["patch_size"]
        return n // cols, cols

    def pool_rows(self, video: Array, num_tokens: int) -> Array:
        b = video.shape[0]
        if self.pool == "cls":
            return layers.pool_one_hot(b, num_tokens, 0)
        return layers.pool_mean(b, num_tokens, int(self.class_token))

    def flops(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        s = self.sizes()
        p, d = s["patch_size"], s["width"]
        t, h, w = self._grid(input_shape)
        q, c, embed = p, input_shape[3], 0
        for width in self._stem_widths():
            q //= 2
            embed += dense_flops(input_shape[0] * q * q * h * w, 9 * c, width)
            c = width
        embed += dense_flops(t * h * w, self.tubelet * q * q * c, d)
        if self.attention == "factorised":
            total = embed + t * s["depth"] * layer_flops(h * w, d, s["mlp_dim"])
            n = t + int(self.class_token)
            return total + self.temporal_depth * layer_flops(n, d, s["mlp_dim"]), n, d
        n = t * h * w + int(self.class_token)
        return embed + s["depth"] * layer_flops(n, d, s["mlp_dim"]), n, d

    def _stem_widths(self) -> list[int]:
        """Channels of the stem's convolutions: doubling up to half the width."""
        return [max(self.sizes()["width"] >> (self.stem - i), 1) for i in range(self.stem)]

    def _encoder(self, depth: int, final_norm: bool, name: str) -> layers.Encoder:
        s = self.sizes()
        return layers.Encoder(
            depth=depth, num_heads=s["num_heads"], mlp_dim=s["mlp_dim"], pre_norm=True,
            final_norm=final_norm, activation=self.activation, qkv_bias=self.qkv_bias,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name=name)

    def _with_cls(self, x: Array, name: str) -> Array:
        if not self.class_token:
            return x
        cls = self.param(name, nn.initializers.zeros, (1, 1, x.shape[-1]), jnp.float32)
        return jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1,
                                                                        x.shape[-1])), x], 1)

    def _positions(self, x: Array) -> Array:
        """``x`` [B, T, N, D] (tubelet embeddings) → [B, T*N (+1), D] with positions."""
        b, t, n, d = x.shape
        init = nn.initializers.normal(stddev=self.pos_embedding_std)
        c = int(self.class_token)
        if self.positions == "factorised":
            space = self.param("pos_embedding", init, (1, n + c, d), jnp.float32)
            time = self.param("time_embedding", init, (1, t, d), jnp.float32)
            x = x + (time[0][:, None] + space[0, c:][None]).astype(x.dtype)
            x = self._with_cls(x.reshape(b, t * n, d), "cls")
            if c:
                x = x.at[:, 0].add(space[0, 0].astype(x.dtype))
            return x
        x = self._with_cls(x.reshape(b, t * n, d), "cls")
        if self.positions == "joint":
            pos = self.param("pos_embedding", init, (1, t * n + c, d), jnp.float32)
        elif self.positions == "sincos":
            pos = jnp.asarray(sincos_positions(t * n + c, d))[None]
        else:
            raise ValueError(f"unknown ViViT positions {self.positions!r}; known: {POSITIONS}")
        return x + pos.astype(x.dtype)

    def _pool(self, x: Array) -> Array:
        if self.pool == "cls":
            if not self.class_token:
                raise ValueError("pool='cls' needs class_token=True")
            return x[:, 0]
        if self.pool == "gap":
            return x[:, int(self.class_token):].mean(axis=1)
        raise ValueError(f"unknown ViViT pool {self.pool!r}; use cls or gap")

    @nn.compact
    def __call__(self, video: Array, *, train: bool = False) -> dict[str, Array | None]:
        s = self.sizes()
        p, dtype, d = s["patch_size"], self.opts.dtype, s["width"]
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, H, W, C], got shape {video.shape}")
        if p % (1 << self.stem):
            raise ValueError(f"ViViT stem={self.stem} halves the patch size {p} that often; "
                             f"it must divide by {1 << self.stem}")
        if video.shape[1] % self.tubelet or video.shape[2] % p or video.shape[3] % p:
            raise ValueError(f"video [T, H, W] = {video.shape[1:4]} is not a multiple of the "
                             f"tubelet ({self.tubelet}, {p}, {p})")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown ViViT attention {self.attention!r}; known: {ATTENTION}")
        x, q = video.astype(dtype), p
        for i, width in enumerate(self._stem_widths()):
            x = nn.gelu(nn.Conv(width, (1, 3, 3), strides=(1, 2, 2),  # torch's padding=1
                                padding=((0, 0), (1, 1), (1, 1)), dtype=dtype,
                                name=f"stem_{i}")(x))
            q //= 2
        x = nn.Conv(d, (self.tubelet, q, q), strides=(self.tubelet, q, q), padding="VALID",
                    dtype=dtype, name="embedding")(x)
        b, t, h, w, _ = x.shape
        x = x.reshape(b, t, h * w, d)
        if self.attention == "joint":
            x = self._positions(x)
            x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
            x = self._encoder(s["depth"], self.final_norm, "encoder")(x, train=train)
            pooled = self._pool(x)
        else:
            if self.positions != "factorised":
                raise ValueError("attention='factorised' needs positions='factorised'")
            space = self.param("pos_embedding", nn.initializers.normal(self.pos_embedding_std),
                               (1, h * w, d), jnp.float32)
            x = (x + space[:, None].astype(x.dtype)).reshape(b * t, h * w, d)
            x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
            x = self._encoder(s["depth"], True, "encoder")(x, train=train)
            x = x.mean(axis=1).reshape(b, t, d)
            time = self.param("time_embedding", nn.initializers.normal(self.pos_embedding_std),
                              (1, t, d), jnp.float32)
            x = self._with_cls(x + time.astype(x.dtype), "temporal_cls")
            x = self._encoder(self.temporal_depth, self.final_norm, "temporal")(x, train=train)
            pooled = self._pool(x)
        if self.pooler:
            pooled = jnp.tanh(nn.Dense(d, dtype=dtype, name="pooler")(pooled))
        return {"tokens": x, "pooled": pooled, "mask": None}
