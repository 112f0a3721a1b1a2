"""A time-series tower (``kind: "series"``): a 1-D patch transformer over ``[B, time, channels]``.

Sensor data as one more modality: the series is cut into patches of ``patch_size`` steps
(overlapping when ``stride`` < ``patch_size``), each patch of all channels embedded linearly
(a strided 1-D convolution), learnt positions added, then the shared pre-LN transformer layers
(``layers.Encoder``, the ViT's); pooled = the mean of the patch tokens. Series of one length per
model: the data path pads or cuts them to ``data.series.length``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

Array = jax.Array


class SeriesEncoder(nn.Module):
    """1-D patch transformer; sizes from ``variant`` ("mu", ...) with overrides."""

    variant: str = "mu"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int = 16
    stride: int = 0  # 0: patch_size (no overlap)
    pos_embedding_std: float = 0.02
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, series: Array, *, train: bool = False) -> dict[str, Array | None]:
        s = layers.tower_sizes(self.variant, width=self.width, depth=self.depth,
                               mlp_dim=self.mlp_dim, num_heads=self.num_heads)
        p, dtype = self.patch_size, self.opts.dtype
        if series.ndim != 3 or series.shape[1] < p:
            raise ValueError(f"SeriesEncoder takes [batch, time, channels] with at least "
                             f"patch_size={p} steps, got {series.shape}")
        x = nn.Conv(s["width"], (p,), strides=(self.stride or p,), padding="VALID", dtype=dtype,
                    name="embedding")(series.astype(dtype))
        pos = self.param("pos_embedding", nn.initializers.normal(self.pos_embedding_std),
                         (1, x.shape[1], s["width"]), jnp.float32)
        x = nn.Dropout(self.opts.dropout)(x + pos.astype(x.dtype), deterministic=not train)
        x = layers.Encoder(
            depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"], pre_norm=True,
            final_norm=True, opts=self.opts, scan=self.opts.scan_layers, name="encoder",
        )(x, train=train)
        return {"tokens": x, "pooled": x.mean(axis=1), "mask": None}
