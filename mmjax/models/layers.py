"""Transformer building blocks shared by every tower, the fusion and the heads.

One attention module and one block serve the ViT, the BERT-style text encoder and the fusion
layers, so that options (pre/post LayerNorm, activation, qkv bias, causal mask, attention backend)
exist once and a Hugging Face checkpoint maps onto the very modules the trainer uses. The
settings every layer shares (compute dtype, dropout, attention backend, remat, scan) travel in one
frozen :class:`Options` instead of a field per module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import gpu_rewrites, scan

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Options:
    """Model-wide settings, from ``config.model``'s top-level keys.

    ``dtype``: compute dtype (params stay float32). ``dropout``: the one rate of the whole model.
    ``attn_implementation``: passed to ``jax.nn.dot_product_attention`` (None, "xla", "cudnn",
    or "auto" = cuDNN on a GPU where the shapes allow, see :func:`resolve_attention`).
    ``remat``: a ``jax.checkpoint_policies`` name applied to every block. ``scan_layers`` /
    ``scan_unroll``: run each encoder's layers as one ``nn.scan`` (``models.scan``).
    ``gpu_rewrites``: the opt-in rewrites of ``models.gpu_rewrites``. ``bn_axis_name``: the pmap
    axis over which BatchNorm averages its statistics. ``explain``: attention computed with
    explicit weights, which are sown (``intermediates``/``attention``) and exposed to gradients
    (``perturbations``/``attention``), and every block's output sown (``intermediates``/
    ``tokens``), for ``mmjax.explain``; parameters are the same either way.
    """

    dtype: Any = jnp.float32
    dropout: float = 0.0
    attn_implementation: str | None = None
    remat: str | None = None
    scan_layers: bool = False
    scan_unroll: int = 0
    gpu_rewrites: bool = False
    bn_axis_name: str | None = None
    explain: bool = False


# width, depth, mlp_dim, num_heads; one table for image and text towers (big_vision's sizes).
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
    """A size string such as ``"B/16"`` (ViT) or ``"B"`` (text) → layer sizes (+ patch size)."""
    m = re.fullmatch(r"(?P<size>[A-Za-z]+)(/(?P<patch>\d+))?", variant)
    if m is None or m.group("size") not in _SIZES:
        raise ValueError(
            f"unknown model variant {variant!r}; expected one of {sorted(_SIZES)} "
            "optionally followed by /<patch size>, e.g. 'B/16'"
        )
    width, depth, mlp_dim, heads = _SIZES[m.group("size")]
    out = {"width": width, "depth": depth, "mlp_dim": mlp_dim, "num_heads": heads}
    if m.group("patch"):
        out["patch_size"] = int(m.group("patch"))
    return out


def tower_sizes(variant: str, **overrides: int | None) -> dict[str, int]:
    """``decode_variant(variant)`` with every override that is not None applied on top."""
    size = decode_variant(variant)
    size.update({k: v for k, v in overrides.items() if v is not None})
    return size


def quick_gelu(x: Array) -> Array:
    """CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact (erf): BERT's, ViT's, open_clip's
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # Hugging Face's gelu_new
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def get_activation(name: str, opts: Options = Options()) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    if opts.gpu_rewrites and name in gpu_rewrites.ACTIVATIONS:
        return gpu_rewrites.ACTIVATIONS[name]
    return ACTIVATIONS[name]


def add_positions(x: Array, pos: Array, opts: Options) -> Array:
    """``x`` [B, T, D] plus learnt positions ``pos`` [T, D], in the compute dtype."""
    if x.ndim != 3 or pos.shape != x.shape[1:]:
        raise ValueError(f"positions {pos.shape} do not fit tokens {x.shape} ([B, T, D])")
    if opts.gpu_rewrites:
        return gpu_rewrites.add_positions(x, pos, opts.dtype)
    return (x + pos).astype(opts.dtype)


def masked_mean(x: Array, mask: Array | None, opts: Options = Options()) -> Array:
    """Mean over the tokens of [B, T, D] where ``mask`` is 1 (a row with none gives zeros)."""
    if mask is None:
        return x.mean(axis=1)
    if opts.gpu_rewrites:
        return gpu_rewrites.masked_mean(x, mask)
    m = mask.astype(jnp.float32)[..., None]
    total = (x.astype(jnp.float32) * m).sum(axis=1)
    return (total / jnp.maximum(m.sum(axis=1), 1.0)).astype(x.dtype)


def padding_mask(kv_mask: Array | None) -> Array | None:
    """[B, Tk] key validity -> boolean attention mask [B, 1, 1, Tk].

    Only keys are masked, as Hugging Face does: padded query rows attend to the valid keys, stay
    finite, and are ignored by pooling and losses.
    """
    if kv_mask is None:
        return None
    return kv_mask.astype(bool)[:, None, None, :]


def resolve_attention(
    dtype: Any, q_len: int, kv_len: int, head_dim: int, backend: str | None = None
) -> str | None:
    """The backend ``attn_implementation="auto"`` uses for one call: "cudnn" on a GPU for the
    shapes cuDNN's fused kernel accepts (half precision, head size a multiple of 8 up to 128,
    even query and key lengths), else None (XLA), so one config runs on any device."""
    backend = backend or jax.default_backend()
    fits = (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and q_len % 2 == 0
        and kv_len % 2 == 0
    )
    return "cudnn" if backend in ("gpu", "cuda") and fits else None


def attention_weights(q: Array, k: Array, mask: Array | None, causal: bool) -> Array:
    """Softmax attention weights [B, H, Tq, Tk] (float32) of ``q`` [B, Tq, H, D] over ``k``
    [B, Tk, H, D]: what ``jax.nn.dot_product_attention``'s XLA path computes, materialised."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    big_neg = jnp.finfo(jnp.float32).min
    if causal:
        tq, tk = q.shape[1], k.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((tq, tk), bool)), logits, big_neg)
    if mask is not None:
        logits = jnp.where(mask, logits, big_neg)
    return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """Multi-head attention with Hugging Face-compatible projections (query/key/value/out).

    ``mask`` is boolean, broadcastable to [B, 1, Tq, Tk]; every query row needs a valid key.
    """

    num_heads: int
    qkv_bias: bool = True
    causal: bool = False
    opts: Options = Options()

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None = None, mask: Array | None = None, *,
        train: bool = False,
    ) -> Array:
        context = x if context is None else context
        width, dtype = x.shape[-1], self.opts.dtype
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def dense(name: str) -> nn.Module:
            if self.opts.gpu_rewrites:
                return gpu_rewrites.HeadsDense(self.num_heads, head_dim, use_bias=self.qkv_bias,
                                               dtype=dtype, name=name)
            return nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.qkv_bias,
                                   dtype=dtype, name=name)

        q, k, v = dense("query")(x), dense("key")(context), dense("value")(context)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (x.shape[0], 1, x.shape[1], context.shape[1]))
        implementation: Any = self.opts.attn_implementation  # None, "xla", "cudnn" or "auto"
        if implementation == "auto":
            implementation = resolve_attention(q.dtype, q.shape[1], k.shape[1], head_dim)
        if self.opts.explain:
            weights = attention_weights(q, k, mask, self.causal)
            self.sow("intermediates", "attention", weights)
            weights = self.perturb("attention", weights)
            y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        else:
            y = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=self.causal, implementation=implementation
            )
        y = nn.DenseGeneral(width, axis=(-2, -1), dtype=dtype, name="out")(y)
        return nn.Dropout(self.opts.dropout)(y, deterministic=not train)


class Mlp(nn.Module):
    mlp_dim: int
    activation: str = "gelu"
    opts: Options = Options()

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        h = nn.Dense(self.mlp_dim, dtype=self.opts.dtype, name="fc1")(x)
        h = get_activation(self.activation, self.opts)(h)
        h = nn.Dense(x.shape[-1], dtype=self.opts.dtype, name="fc2")(h)
        return nn.Dropout(self.opts.dropout)(h, deterministic=not train)


class Block(nn.Module):
    """A transformer layer: self-attention, optional cross-attention, MLP.

    ``pre_norm=True`` is the ViT/CLIP layout (LN before each sublayer); ``False`` is BERT's
    (LN after each residual sum). With ``cross_attention`` the block's queries ``x`` also attend
    to ``context``. ``scan_train`` is set only inside a scan, whose body gets arrays, not Python
    values: there ``train`` is fixed by it and the block returns ``(x, None)``.
    """

    num_heads: int
    mlp_dim: int
    pre_norm: bool = True
    activation: str = "gelu"
    qkv_bias: bool = True
    causal: bool = False
    cross_attention: bool = False
    layer_norm_eps: float = 1e-6
    opts: Options = Options()
    scan_train: bool | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
    ) -> Array | tuple[Array, None]:
        if self.scan_train is not None:
            train = self.scan_train

        def sublayer(h: Array, fn: Callable[[Array], Array], name: str) -> Array:
            norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.opts.dtype,
                                name=f"{name}_norm")
            return h + fn(norm(h)) if self.pre_norm else norm(h + fn(h))

        def attention(name: str, causal: bool) -> Attention:
            return Attention(self.num_heads, self.qkv_bias, causal, self.opts, name=name)

        x = sublayer(x, lambda h: attention("attn", self.causal)(
            h, mask=padding_mask(mask), train=train), "attn")
        if self.cross_attention:
            if context is None:
                raise ValueError("a cross-attention block needs a context sequence")
            x = sublayer(x, lambda h: attention("cross_attn", False)(
                h, context, padding_mask(context_mask), train=train), "cross_attn")
        mlp = Mlp(self.mlp_dim, self.activation, self.opts, name="mlp")
        x = sublayer(x, lambda h: mlp(h, train=train), "mlp")
        if self.opts.explain:
            self.sow("intermediates", "tokens", x)
        return (x, None) if self.scan_train is not None else x


class Encoder(nn.Module):
    """``depth`` Blocks named ``layer_<i>`` and an optional final LayerNorm.

    ``scan=True`` runs them as one ``nn.scan`` whose params are stacked under ``layers/`` (same
    math, fewer arrays; ``models.scan``). Towers and the fusion set it from
    ``opts.scan_layers``; head decoders keep the unrolled layout.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    pre_norm: bool = True
    final_norm: bool = True
    activation: str = "gelu"
    qkv_bias: bool = True
    causal: bool = False
    cross_attention: bool = False
    layer_norm_eps: float = 1e-6
    opts: Options = Options()
    scan: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        *,
        train: bool = False,
    ) -> Array:
        block_kwargs = dict(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=self.pre_norm,
            activation=self.activation, qkv_bias=self.qkv_bias, causal=self.causal,
            cross_attention=self.cross_attention, layer_norm_eps=self.layer_norm_eps,
            opts=self.opts,
        )
        # depth 0 has no layers in either layout (a scan of length 0 would make zero-size
        # stacked arrays, which Orbax cannot save).
        if self.scan and self.depth > 0:
            body = scan.remat(Block, self.opts.remat, scanned=True,
                              looped=self.opts.scan_unroll == 1)
            stack = scan.scan_over_layers(body, self.depth, self.opts.scan_unroll)
            x, _ = stack(**block_kwargs, scan_train=train, name=scan.SCANNED)(
                x, mask, context, context_mask
            )
        else:
            block = scan.remat(Block, self.opts.remat)
            for i in range(self.depth):
                x = block(**block_kwargs, name=f"layer_{i}")(x, mask, context, context_mask, train)
        if self.final_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.opts.dtype,
                             name="final_norm")(x)
        return x


# --- pooling weights over tokens, as the explainers ask towers for them -----------------------


def pool_one_hot(b: int, num_tokens: int, idx: Any) -> Array:
    """[B, T] rows that pick token ``idx`` (an int or an int [B])."""
    return jnp.broadcast_to(jnp.eye(num_tokens, dtype=jnp.float32)[idx], (b, num_tokens))


def pool_mean(b: int, num_tokens: int, start: int = 0, mask: Any = None) -> Array:
    """[B, T] rows of the (masked) mean over tokens ``start:``."""
    w = jnp.zeros((b, num_tokens), jnp.float32).at[:, start:].set(1.0)
    if mask is not None:
        w = w * jnp.asarray(mask, jnp.float32)
    return w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
