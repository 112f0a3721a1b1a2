"""A 1-D patch transformer for time series (sensor data): ``[B, time, channels]`` floats.

The series is cut into non-overlapping patches of ``patch_size`` time steps (PatchTST-style,
channels mixed in one embedding), embedded linearly, given learned positions, and run through
the shared ``layers.Encoder``. A patch is valid when any of its time steps is (``mask``), so
series padded to a common length attend only to their own patches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

Array = jax.Array


class SeriesEncoder(nn.Module):
    """``{"tokens": [B, N, D], "pooled": [B, D], "mask": [B, N] | None}`` from ``values``
    ``[B, T, C]`` and an optional ``mask`` ``[B, T]`` (1 = a real time step, 0 = padding).

    ``max_patches`` sizes the position table (T / patch_size must not exceed it). Pooling: the
    masked mean of the patch tokens.
    """

    width: int = 64
    depth: int = 1
    num_heads: int = 4
    mlp_dim: int | None = None
    patch_size: int = 8
    max_patches: int = 64
    pos_embedding_std: float = 0.02
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, values: Array, mask: Array | None = None, *,
                 train: bool = False) -> dict[str, Array | None]:
        if values.ndim != 3:
            raise ValueError(f"a series tower takes [batch, time, channels], got {values.shape}")
        b, t, c = values.shape
        p, dtype = self.patch_size, self.opts.dtype
        if t % p:
            raise ValueError(f"series length {t} is not a multiple of patch_size {p}")
        n = t // p
        if n > self.max_patches:
            raise ValueError(f"series of {t} steps makes {n} patches, more than max_patches="
                             f"{self.max_patches}")
        x = values.astype(dtype).reshape(b, n, p * c)
        x = nn.Dense(self.width, dtype=dtype, name="embedding")(x)
        pos = self.param("pos_embedding", nn.initializers.normal(self.pos_embedding_std),
                         (1, self.max_patches, self.width), jnp.float32)
        x = x + pos[:, :n].astype(dtype)
        x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
        tokens_mask = None if mask is None else mask.reshape(b, n, p).any(-1).astype(jnp.int32)
        x = layers.Encoder(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
            pre_norm=True, final_norm=True, activation=self.activation,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name="encoder",
        )(x, tokens_mask, train=train)
        return {"tokens": x, "pooled": layers.masked_mean(x, tokens_mask, self.opts),
                "mask": tokens_mask}
