"""Vision Transformer image encoder; its size comes from a variant string ("mu/8", "B/16")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.flops import dense_flops, layer_flops

Array = jax.Array


class ViT(nn.Module):
    """ViT returning ``{"tokens": [B, N, D], "pooled": [B, D], "mask": None}``.

    ``width``/``depth``/``mlp_dim``/``num_heads``/``patch_size`` override the variant's values
    (None keeps them), so a demo-sized tower needs no new variant name. The layout options
    (``class_token``, ``embed_norm``, ``final_norm``, ``pool_norm``, ``pooler``) exist so the
    Hugging Face ViT and CLIP vision towers load into this same module.

    ``patch_bias=False`` drops the patch-embedding bias, as CLIP's vision tower does.

    ``pos_embedding_std`` (default 0.02, ViT's and big_vision's) scales the learnt position
    embeddings at initialisation. At 0.02 a patch token is almost only its content, so tokens are
    nearly exchangeable until training grows the embeddings; when an answer depends on where ink
    sits across patches, that growth has little gradient to follow and training can stall. At
    the scale of the content (1.0) every token knows its place from the first step
    (docs/recipes.md).

    Pooling: "cls" (needs ``class_token``), "gap" (mean of patch tokens), "none" (first token).
    cuDNN's fused attention wants even sequence lengths, so ``gap`` without a class token is the
    default for towers trained from scratch.

    ``keep`` (int [B, K] patch indices, row-major over the patch grid) runs the transformer on
    those patches only, for MAE-style masked image modelling: patches are embedded and given
    their position embeddings first, so a kept token carries its place in the image, then only
    the kept ones (behind the class token, which is always kept) go through the blocks. Tokens
    and pooling are then over the K kept patches.
    """

    variant: str = "mu/8"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    class_token: bool = False
    pool: str = "gap"
    embed_norm: bool = False
    final_norm: bool = True
    pool_norm: bool = False
    pooler: bool = False
    activation: str = "gelu"
    qkv_bias: bool = True
    patch_bias: bool = True
    pos_embedding_std: float = 0.02  # stddev of the position embeddings' normal initialisation
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()

    def sizes(self) -> dict[str, int]:
        size = layers.tower_sizes(
            self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
            num_heads=self.num_heads, patch_size=self.patch_size,
        )
        if "patch_size" not in size:
            raise ValueError(f"ViT variant {self.variant!r} names no patch size (e.g. 'B/16')")
        return size

    # --- what the explainers and the benchmark ask (mmjax.models.encoders) ---------------------

    def prefix_tokens(self) -> int:
        return int(self.class_token)

    def token_grid(self, input_shape: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
        p = self.sizes()["patch_size"]
        return input_shape[0] // p, input_shape[1] // p

    def pool_rows(self, image: Array, num_tokens: int) -> Array:
        b = image.shape[0]
        if self.pool in ("cls", "none"):
            return layers.pool_one_hot(b, num_tokens, 0)
        return layers.pool_mean(b, num_tokens, int(self.class_token))

    def flops(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        s = self.sizes()
        p, d = s["patch_size"], s["width"]
        n = (input_shape[0] // p) * (input_shape[1] // p)
        t = n + int(self.class_token)
        total = dense_flops(n, p * p * input_shape[2], d) + s["depth"] * layer_flops(
            t, d, s["mlp_dim"])
        return total + (dense_flops(1, d, d) if self.pooler else 0), t, d

    @nn.compact
    def __call__(
        self, image: Array, *, train: bool = False, keep: Array | None = None
    ) -> dict[str, Array | None]:
        s = self.sizes()
        p, dtype = s["patch_size"], self.opts.dtype
        if image.shape[1] % p or image.shape[2] % p:
            raise ValueError(f"image size {image.shape[1:3]} is not a multiple of patch {p}")
        x = nn.Conv(
            s["width"], (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
            dtype=dtype, name="embedding",
        )(image.astype(dtype))
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if self.class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=self.pos_embedding_std),
            (1, x.shape[1], d), jnp.float32,
        )
        x = x + pos.astype(x.dtype)
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != b:
                raise ValueError(f"keep must be int patch indices [B={b}, K], got {keep.shape}")
            c = int(self.class_token)
            kept = jnp.take_along_axis(x[:, c:], keep[:, :, None].astype(jnp.int32), axis=1)
            x = jnp.concatenate([x[:, :c], kept], axis=1)
        if self.embed_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=dtype, name="embed_norm")(x)
        x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
        x = layers.Encoder(
            depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"], pre_norm=True,
            final_norm=self.final_norm, activation=self.activation, qkv_bias=self.qkv_bias,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name="encoder",
        )(x, train=train)
        if self.pool == "cls":
            if not self.class_token:
                raise ValueError("pool='cls' needs class_token=True")
            pooled = x[:, 0]
        elif self.pool == "gap":
            pooled = x[:, 1:].mean(axis=1) if self.class_token else x.mean(axis=1)
        elif self.pool == "none":
            pooled = x[:, 0]
        else:
            raise ValueError(f"unknown ViT pool {self.pool!r}; use cls, gap or none")
        if self.pool_norm:
            pooled = nn.LayerNorm(
                epsilon=self.layer_norm_eps, dtype=dtype, name="pool_norm"
            )(pooled)
        if self.pooler:
            pooled = jnp.tanh(nn.Dense(d, dtype=dtype, name="pooler")(pooled))
        return {"tokens": x, "pooled": pooled, "mask": None}
