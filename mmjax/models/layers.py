"""Transformer building blocks shared by every tower and by fusion.

One attention module and one block serve the ViT, the BERT-style text encoder and the fusion
layers, so that options (pre/post LayerNorm, activation, qkv bias, causal mask, attention backend)
exist once and a Hugging Face checkpoint maps onto the very modules the trainer uses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

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
    """Decodes a size string such as ``"B/16"`` (ViT) or ``"B"`` (text) into layer sizes.

    The part after "/" is the patch size; it is absent for text towers. Sizes live here only, so
    every tower of a given name has the same shape.
    """
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
    """``decode_variant(variant)`` with every override that is not None applied on top.

    Both towers size themselves through this, so "a variant plus explicit widths" means the
    same thing for images and text.
    """
    size = decode_variant(variant)
    size.update({k: v for k, v in overrides.items() if v is not None})
    return size


def quick_gelu(x: Array) -> Array:
    """CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def _keeps_input(fn: Callable[[Array], Array],
                 slope: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """``fn`` with a hand-written backward pass, ``g · slope(x)`` (x in float32 at least), that
    saves nothing but ``x``: an elementwise activation whose autodiff would keep intermediates."""
    wrapped = jax.custom_vjp(fn)

    def bwd(x: Array, g: Array) -> tuple[Array]:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return ((g.astype(xf.dtype) * slope(xf)).astype(x.dtype),)

    wrapped.defvjp(lambda x: (wrapped(x), x), bwd)
    return wrapped


def _gelu_slope(x: Array) -> Array:
    """Φ(x) + x·φ(x), the exact GELU's derivative."""
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf


def _gelu_tanh_slope(x: Array) -> Array:
    """d/dx of x·(1 + tanh u)/2 with u = c·(x + 0.044715·x³): (1 + t)/2 + x·(1 - t²)·u'/2."""
    x2 = x * x
    t = jnp.tanh(_SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x2))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x2)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, ``x·Φ(x)``, whose backward pass keeps only ``x``.

    The value is ``nn.gelu(x, approximate=False)``'s. Its autodiff saves three more
    activation-sized tensors for the backward pass (x/2, the erfc term and exp(-x²/2)); compiled
    for an H200 the forward fusion then writes two extra [B, T, mlp_dim] outputs per layer
    (2 x 308 MB for a ViT-B/16 layer at batch 256), read again in the backward pass. Here the
    derivative Φ(x) + x·φ(x) is recomputed from ``x`` (in float32 at least), which the backward
    fusion does at no extra memory traffic (docs/performance.md §9).
    """
    return nn.gelu(x, approximate=False)


def gelu_tanh(x: Array) -> Array:
    """Tanh-approximated GELU (``nn.gelu(x, approximate=True)``'s value; HF's ``gelu_new``)
    whose backward pass keeps only ``x``.

    Beyond the memory :func:`gelu` saves, this lets XLA's GPU compiler put the activation into
    the preceding matmul: cuBLASLt has a bias + tanh-GELU epilogue, and XLA rewrites
    ``dense -> gelu_tanh`` into it only when no other op reads the formula's intermediates.
    Under plain autodiff the backward pass reads them (the tanh), so the GELU stays a separate
    kernel; with this VJP the fc1 matmul writes the activation and, as the epilogue's auxiliary
    output, its input x for the backward pass (compiled for an H200: every fc1 matmul becomes a
    ``BIAS_GELU_AUX`` cuBLASLt call; docs/performance.md §10).
    """
    return nn.gelu(x, approximate=True)


gelu = _keeps_input(gelu, _gelu_slope)
gelu_tanh = _keeps_input(gelu_tanh, _gelu_tanh_slope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_positions(x: Array, pos: Array, dtype: Dtype) -> Array:
    """``(x + pos).astype(dtype)``: learnt position embeddings ``pos`` [T, D] (or [1, T, D])
    added to every example of ``x`` [B, T, D], then cast to the compute dtype, with the gradient
    of ``pos`` (the sum over the batch) computed as a matmul with a vector of ones.

    The value and gradients are those of plain broadcasting. The reason is XLA's GPU layout
    assignment: it lays a reduction's operand out with the reduced dimension minor-most, and the
    batch sum of the [B, T, D] embedding gradient then made the text tower's whole residual
    stream [T, D, B] in memory, so every residual add and LayerNorm of every layer, forward and
    backward, transposed (compiled for an H200: 176 top-level arrays laid out batch-minor in the
    CLIP step, 129 in the fusion config's; 3 with this). As a matmul the layout stays row-major
    (docs/performance.md §11). The cast is part of the function so that the incoming gradient
    has the compute dtype: for bfloat16 the matmul takes bfloat16 operands (exact products with
    ones, float32 accumulation); a float32 sum asks for full float32 precision (``HIGHEST``),
    with which XLA keeps it a plain reduction.
    """
    if x.ndim != 3 or pos.shape[-2:] != x.shape[1:] or pos.ndim not in (2, 3) or (
            pos.ndim == 3 and pos.shape[0] != 1):
        raise ValueError(f"add_positions wants x [B, T, D] and pos [T, D] or [1, T, D]; got x "
                         f"{x.shape} and pos {pos.shape}")
    return (x + pos).astype(dtype)


def _add_positions_fwd(x: Array, pos: Array, dtype: Dtype) -> tuple[Array, tuple[Array, Array]]:
    # The ones carry the batch size and x's dtype into the backward pass; pos (a parameter, alive
    # anyway) carries its shape and dtype.
    return add_positions(x, pos, dtype), (jnp.ones((x.shape[0],), x.dtype), pos)


def _add_positions_bwd(dtype: Dtype, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    ones, pos = res
    exact = jnp.finfo(g.dtype).bits <= 16  # a 16-bit g times 1 is exact in any matmul precision
    gpos = jnp.einsum("b,btd->td", ones.astype(g.dtype), g,
                      precision=None if exact else jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.promote_types(g.dtype, jnp.float32))
    return g.astype(ones.dtype), gpos.reshape(pos.shape).astype(pos.dtype)


add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def padding_mask(kv_mask: Array | None) -> Array | None:
    """[B, Tk] key validity -> boolean attention mask [B, 1, 1, Tk].

    Only keys are masked, as Hugging Face does: padded query rows attend to the valid keys, stay
    ordinary finite vectors, and are ignored by pooling and losses. Masking queries too would
    leave rows with no valid key, which XLA turns into uniform weights but fused kernels need
    not handle the same way.
    """
    if kv_mask is None:
        return None
    return kv_mask.astype(bool)[:, None, None, :]


def resolve_attention(
    dtype: Any, q_len: int, kv_len: int, head_dim: int, backend: str | None = None
) -> str | None:
    """The backend that ``implementation="auto"`` uses for one attention call.

    "cudnn" on a GPU when the shapes are ones cuDNN's fused kernel accepts: half-precision
    inputs, a head size that is a multiple of 8 up to 128, and even query and key lengths
    (GUIDE §6: on an H200 cuDNN refused 197 tokens, and 77 with a causal mask, while 196 ran
    2.2x faster than XLA; JAX's own check refuses odd lengths whenever a mask is trained
    through). Anywhere else None, i.e. XLA's reference attention, so that the same
    config runs on a CPU and on shapes cuDNN would reject at compile time.
    """
    backend = backend or jax.default_backend()
    fits = (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and q_len % 2 == 0
        and kv_len % 2 == 0
    )
    return "cudnn" if backend in ("gpu", "cuda") and fits else None


class HeadsDense(nn.Module):
    """``x [..., D] → [..., heads, head_dim]``: ``nn.DenseGeneral((heads, head_dim))``'s params
    (``kernel`` [D, heads, head_dim], ``bias`` [heads, head_dim], the same initialisers, so the
    same values for the same key) computed as one 2-D matmul plus a vector bias.

    Why not DenseGeneral itself: it adds the bias after reshaping the product to
    [..., heads, head_dim], and compiled for an H200 that add stayed a separate kernel after
    each query/key/value GEMM (a read and write of the whole activation, 72 kernels per CLIP
    step); a bias on the 2-D product is what XLA folds into the cuBLAS epilogue, as it already
    did for the ``out`` projection (docs/performance.md §9).
    """

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, n = x.shape[-1], self.num_heads * self.head_dim
        shape = (d, self.num_heads, self.head_dim)
        kernel = self.param(  # drawn on the flat [D, heads*head_dim] shape, as DenseGeneral does
            "kernel", lambda rng, s, t=jnp.float32: nn.initializers.lecun_normal()(
                rng, (s[0], s[1] * s[2]), t).reshape(s), shape, jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.reshape(d, n).astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.head_dim),
                              jnp.float32)
            y = y + bias.reshape(n).astype(self.dtype)
        return y.reshape(*x.shape[:-1], self.num_heads, self.head_dim)


class Attention(nn.Module):
    """Multi-head attention with HF-compatible projections (query/key/value/out).

    ``implementation`` is passed to ``jax.nn.dot_product_attention``: None lets JAX choose (XLA
    everywhere), "cudnn" asks for the fused kernel on NVIDIA GPUs, "xla" forces the reference path.
    "auto" picks "cudnn" only where it is known to work (see :func:`resolve_attention`) and None
    elsewhere, so one config runs fused on a GPU and unchanged on a CPU.
    ``mask`` is boolean, broadcastable to [B, 1, Tq, Tk]; every query row needs a valid key.
    ``kv_lengths`` (int32 [B], instead of a mask) says that the first ``kv_lengths[b]`` keys of
    row b are valid and the rest padding: cuDNN then applies its own padding mask, where a
    boolean mask reaches it as a [B, 1, Tq, Tk] bias tensor (built, read, and on some JAX
    versions differentiated every step). XLA builds the same boolean mask from the lengths.
    """

    num_heads: int
    qkv_bias: bool = True
    causal: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        mask: Array | None = None,
        *,
        kv_lengths: Array | None = None,
        train: bool = False,
    ) -> Array:
        if mask is not None and kv_lengths is not None:
            raise ValueError("give attention a mask or kv_lengths, not both")
        context = x if context is None else context
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        dense = lambda name, bias: HeadsDense(
            self.num_heads, head_dim, use_bias=bias, dtype=self.dtype, name=name
        )
        q = dense("query", self.qkv_bias)(x)
        k = dense("key", self.qkv_bias)(context)
        v = dense("value", self.qkv_bias)(context)
        if mask is not None:
            mask = jnp.broadcast_to(
                mask, (x.shape[0], 1, x.shape[1], context.shape[1])
            )
        implementation = self.implementation
        if implementation == "auto":
            implementation = resolve_attention(q.dtype, q.shape[1], k.shape[1], head_dim)
        y = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=self.causal, implementation=implementation,
            key_value_seq_lengths=kv_lengths,
        )
        y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(y)
        return nn.Dropout(self.dropout)(y, deterministic=not train)


class Mlp(nn.Module):
    mlp_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        width = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        h = get_activation(self.activation)(h)
        h = nn.Dense(width, dtype=self.dtype, name="fc2")(h)
        return nn.Dropout(self.dropout)(h, deterministic=not train)


class Block(nn.Module):
    """A transformer layer: self-attention, optional cross-attention, MLP.

    ``pre_norm=True`` is the ViT/CLIP layout (LN before each sublayer); ``False`` is BERT's
    (LN after each residual sum). Cross-attention (``context`` given) makes the block a fusion
    layer whose queries are ``x`` and keys/values ``context``.
    """

    num_heads: int
    mlp_dim: int
    pre_norm: bool = True
    activation: str = "gelu"
    qkv_bias: bool = True
    causal: bool = False
    cross_attention: bool = False
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attn_implementation: str | None = None
    # "lengths": ``mask`` and ``context_mask`` are right padding, passed to attention as key
    # lengths (faster on cuDNN; see Attention); "mask": any [B, T] key mask, passed as a
    # boolean mask.
    kv_padding: str = "mask"
    # Set only by a scanned Encoder: ``nn.scan`` hands its body arrays, not Python values, so
    # there ``train`` is fixed here and the block returns ``(x, None)`` (carry, no output).
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
        norm = lambda name: nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, name=name
        )
        attn = lambda name, causal: Attention(
            self.num_heads,
            qkv_bias=self.qkv_bias,
            causal=causal,
            dropout=self.dropout,
            dtype=self.dtype,
            implementation=self.attn_implementation,
            name=name,
        )

        def sublayer(h: Array, fn: Callable[[Array], Array], name: str) -> Array:
            if self.pre_norm:
                return h + fn(norm(f"{name}_norm")(h))
            return norm(f"{name}_norm")(h + fn(h))

        if self.kv_padding not in KV_PADDINGS:
            raise ValueError(f"kv_padding={self.kv_padding!r} is not one of {KV_PADDINGS}")
        def keys(kv_mask: Array | None) -> dict[str, Array | None]:
            if kv_mask is not None and self.kv_padding == "lengths":
                # At least one key per row, as a boolean mask's row of one valid token gives.
                return {"kv_lengths": jnp.maximum(kv_mask.sum(-1), 1).astype(jnp.int32)}
            return {"mask": padding_mask(kv_mask)}

        x = sublayer(
            x, lambda h: attn("attn", self.causal)(h, **keys(mask), train=train), "attn"
        )
        if self.cross_attention:
            if context is None:
                raise ValueError("a cross-attention block needs a context sequence")
            x = sublayer(
                x,
                lambda h: attn("cross_attn", False)(
                    h, context, **keys(context_mask), train=train
                ),
                "cross_attn",
            )
        mlp = Mlp(self.mlp_dim, self.activation, self.dropout, self.dtype, name="mlp")
        x = sublayer(x, lambda h: mlp(h, train=train), "mlp")
        return (x, None) if self.scan_train is not None else x


KV_PADDINGS = ("mask", "lengths")
# A config's ``padding`` (text tower, fusion) -> Block.kv_padding: "right" padding can go to
# attention as key lengths, any other 0/1 mask as a boolean mask.
PADDINGS = {"right": "lengths", "mask": "mask"}


def kv_padding_of(padding: str, what: str) -> str:
    """``Block.kv_padding`` for a config's ``padding`` (:data:`PADDINGS`); a ValueError that
    names ``what`` (the config key) for any other value."""
    if padding not in PADDINGS:
        raise ValueError(f"{what} {padding!r} is not one of {tuple(PADDINGS)}")
    return PADDINGS[padding]


def remat_block(policy: str | None, *, scanned: bool = False,
                looped: bool = True) -> type[Block]:
    """Block, rematerialised under a named ``jax.checkpoint_policies`` policy when one is given.

    ``scanned``: the Block is a scan body (``train`` is a field there); ``looped``: one layer per
    loop iteration, where the loop itself keeps XLA's CSE from merging the recomputation back
    into the forward pass, so remat's own CSE barrier is not needed.
    """
    if not policy:
        return Block
    if not hasattr(jax.checkpoint_policies, policy):
        raise ValueError(f"unknown remat policy {policy!r} (model.remat)")
    policy_fn = getattr(jax.checkpoint_policies, policy)
    if scanned:
        return nn.remat(Block, policy=policy_fn, prevent_cse=not looped)
    # train (argument 5, counting self) selects dropout, so it must stay a Python bool.
    return nn.remat(Block, policy=policy_fn, static_argnums=(5,))


def scan_over_layers(layer_cls: type[nn.Module], depth: int, unroll: int = 0) -> type[nn.Module]:
    """``layer_cls`` run ``depth`` times as one ``nn.scan``: params stacked on axis 0, a fresh
    init and dropout draw per layer, every call argument after the carry broadcast to all.

    ``unroll`` layers run per loop iteration (``jax.lax.scan``'s ``unroll``; 0 = all of them, so
    the compiled step has no loop at all, only the stacked params; the default). Why not a loop:
    the gradient of a scan stacks each layer's saved activations into [depth, ...] buffers that
    XLA first zero-fills, and inside a loop XLA cannot recompute what it recomputes across an
    unrolled step: compiled for an H200, the CLIP B/16 step at batch 256 fills 38 GiB per step
    and needs 38 GiB of temp buffers as a loop, against 0.1 and 22.6 unrolled
    (docs/performance.md §8). A loop compiles faster, which is what ``unroll=1`` is for. The
    math and the params are the same for every ``unroll``.
    """
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=depth,
        unroll=unroll if unroll > 0 else depth,
    )


SCANNED = "layers"  # the subtree of a scanned Encoder: every Block param stacked on axis 0
# The scanned co-attention fusion: co_layers/<stream>/<Block param>, stacked, for the unrolled
# <stream>_layer_<i>/<Block param> (two streams per layer, one scan).
SCANNED_PAIRS = "co_layers"
_LAYER_KEY = re.compile(r"layer_(\d+)")
_STREAM_LAYER_KEY = re.compile(r"(.+)_layer_(\d+)")


class Encoder(nn.Module):
    """A stack of ``depth`` Blocks named ``layer_<i>``, with an optional final LayerNorm.

    ``scan=True`` runs the same blocks as one ``nn.scan`` (a loop in the compiled step) whose
    params are stacked: ``layers/<block param>`` with a leading axis of size ``depth`` instead of
    ``depth`` subtrees ``layer_<i>/<block param>``. The math is the same (tests/test_scan.py);
    what changes is the number of arrays: a ViT-B/16 + text CLIP state has ~1,200 leaves
    unrolled and ~150 scanned, and the host's per-step dispatch cost grows with the leaf count
    (docs/performance.md §5), as does the number of small optimizer kernels. Compile time drops
    too. :func:`match_layers` converts params between the two layouts.
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
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attn_implementation: str | None = None
    remat: str | None = None
    scan: bool = False
    scan_unroll: int = 0  # layers per loop iteration of the scan, 0 = all (scan_over_layers)
    kv_padding: str = "mask"  # see Block

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
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            pre_norm=self.pre_norm,
            activation=self.activation,
            qkv_bias=self.qkv_bias,
            causal=self.causal,
            cross_attention=self.cross_attention,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            kv_padding=self.kv_padding,
        )
        if self.scan and self.depth > 0:  # depth 0: no layers at all, as unrolled (and Orbax
            # cannot save the zero-size stacked arrays a scan of length 0 would create)
            body = remat_block(self.remat, scanned=True, looped=self.scan_unroll == 1)
            stack = scan_over_layers(body, self.depth, self.scan_unroll)
            x, _ = stack(**block_kwargs, scan_train=train, name=SCANNED)(
                x, mask, context, context_mask
            )
        else:
            block_cls = remat_block(self.remat)
            for i in range(self.depth):
                x = block_cls(**block_kwargs, name=f"layer_{i}")(
                    x, mask, context, context_mask, train
                )
        if self.final_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_norm")(x)
        return x


def _stack_blocks(blocks: dict[int, Any], what: str) -> Any:
    """``{0: tree, ..., n-1: tree}`` → one tree whose leaves are stacked on a new axis 0."""
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{what}: layers {sorted(blocks)} are not 0 .. n-1, so they cannot be "
                         "stacked")
    return jax.tree.map(lambda *xs: np.stack(xs), *(blocks[i] for i in range(len(blocks))))


def stacked_depth(stacked: Any, what: str = SCANNED) -> int:
    """The layer count of a stacked subtree: the leading axis all its leaves share."""
    depth = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if len(depth) != 1:
        raise ValueError(f"{what}: the stacked leaves disagree on the depth: {sorted(depth)}")
    return depth.pop()


def _slices(stacked: Any, prefix: str, what: str) -> dict[str, Any]:
    """A stacked subtree → ``{<prefix>layer_<i>: layer i's tree}``."""
    return {f"{prefix}layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
            for i in range(stacked_depth(stacked, what))}


def _collect(tree: Mapping[str, Any], pattern: re.Pattern) -> tuple[dict, dict[str, Any]]:
    """Splits ``tree`` into ``{stream: {i: layer tree}}`` (keys matching ``pattern``; stream ""
    for plain ``layer_<i>``) and the other entries."""
    groups: dict[str, dict[int, Any]] = {}
    rest = {}
    for k, v in tree.items():
        if m := pattern.fullmatch(str(k)):
            *stream, i = m.groups()
            groups.setdefault(stream[0] if stream else "", {})[int(i)] = v
        else:
            rest[k] = v
    return groups, rest


def _stack(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{layer_0: t0, ..., layer_<n-1>: t_n-1, rest}`` → ``{layers: stacked, rest}``."""
    groups, rest = _collect(tree, _LAYER_KEY)
    return {**rest, SCANNED: _stack_blocks(groups[""], "layer_<i>")}


def _unstack(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_stack`: axis 0 of every ``layers`` leaf becomes ``layer_<i>``."""
    rest = {k: v for k, v in tree.items() if k != SCANNED}
    return {**rest, **_slices(tree[SCANNED], "", SCANNED)}


def _stack_pairs(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{<s>_layer_<i>: ...}`` for each stream s → ``{co_layers: {s: stacked}}``."""
    groups, rest = _collect(tree, _STREAM_LAYER_KEY)
    return {**rest, SCANNED_PAIRS: {s: _stack_blocks(b, f"{s}_layer_<i>")
                                    for s, b in groups.items()}}


def _unstack_pairs(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_stack_pairs`."""
    out = {k: v for k, v in tree.items() if k != SCANNED_PAIRS}
    for s, stacked in tree[SCANNED_PAIRS].items():
        out.update(_slices(stacked, f"{s}_", f"{SCANNED_PAIRS}/{s}"))
    return out


def _has_stream_layers(tree: Mapping[str, Any]) -> bool:
    return any(_STREAM_LAYER_KEY.fullmatch(str(k)) for k in tree)


def match_layers(source: Any, target: Any) -> Any:
    """``source`` params with every encoder's layers in ``target``'s layout (scanned or not).

    Walks both trees together: where ``target`` has a scanned ``layers`` subtree and ``source``
    has ``layer_<i>`` subtrees, they are stacked; the other way round they are split; the same for
    the co-attention fusion's ``co_layers/<stream>`` and ``<stream>_layer_<i>``. Everything
    else is returned as is (names that differ are left for the caller's own check), so a
    checkpoint or Hugging Face tower saved unrolled loads into a scanned model and back. Only
    the layout is converted; the values are numpy arrays where a conversion happened.
    """
    if not isinstance(source, Mapping) or not isinstance(target, Mapping):
        return source
    src = dict(source)
    if SCANNED in target and SCANNED not in src and "layer_0" in src:
        src = _stack(src)
    elif "layer_0" in target and SCANNED in src and "layer_0" not in src:
        src = _unstack(src)
    if SCANNED_PAIRS in target and SCANNED_PAIRS not in src and _has_stream_layers(src):
        src = _stack_pairs(src)
    elif SCANNED_PAIRS in src and SCANNED_PAIRS not in target and _has_stream_layers(target):
        src = _unstack_pairs(src)
    return {k: match_layers(v, target[k]) if k in target else v for k, v in src.items()}


def unstack_all(tree: Any) -> Any:
    """``tree`` with every scanned subtree split into ``layer_<i>`` (the HF layout)."""
    if not isinstance(tree, Mapping):
        return tree
    tree = _unstack(tree) if SCANNED in tree else tree
    tree = _unstack_pairs(tree) if SCANNED_PAIRS in tree else tree
    return {k: unstack_all(v) for k, v in tree.items()}


def is_stacked(path: str) -> bool:
    """Whether a param path (``a/b/c``) lies in stacked layers (``layers/`` or ``co_layers/``)."""
    return f"/{SCANNED}/" in f"/{path}" or f"/{SCANNED_PAIRS}/" in f"/{path}"


def layer_paths(path: str, depth: int) -> list[str]:
    """The unrolled names of a stacked leaf's ``depth`` slices, layer 0 first.

    ``image/encoder/layers/mlp/fc1/kernel`` → ``image/encoder/layer_<i>/mlp/fc1/kernel`` and
    ``fusion/co_layers/<s>/...`` → ``fusion/<s>_layer_<i>/...`` (also inside ``lora/``), so a
    regex written for the unrolled layout (``optimizer.freeze="image/encoder/layer_[0-5]/"``)
    can be applied to each layer of a scanned model. A path that is not stacked is returned alone.
    """
    parts = path.split("/")
    for j, part in enumerate(parts):
        if part == SCANNED:
            return ["/".join([*parts[:j], f"layer_{i}", *parts[j + 1:]]) for i in range(depth)]
        if part == SCANNED_PAIRS and j + 1 < len(parts):
            stream = parts[j + 1]
            return ["/".join([*parts[:j], f"{stream}_layer_{i}", *parts[j + 2:]])
                    for i in range(depth)]
    return [path]


def masked_mean(x: Array, mask: Array | None) -> Array:
    """Mean over the token axis of [B, T, D], counting only tokens where mask is 1 (a row
    without any valid token gives zeros).

    The masked sum is a batched matrix product of the rows ``[mask, 0]`` ([B, 2, T]) with x,
    float32 accumulation (``HIGHEST`` precision for float32 x), not a multiply and a reduction.
    The reason is XLA's GPU layout assignment: a reduction over the token axis lays its operand
    out token-minor, and elementwise ops carry that layout up the stream that feeds it, so the
    co-attention fusion's text stream, every residual add and LayerNorm of it, forward and
    backward, was stored [B, D, T] and transposed to and from its GEMMs (compiled for an H200:
    ~1 ms of the fusion config's step, docs/performance.md §14). The zero row is what keeps it a
    matrix product: XLA rewrites a product with a single row (a vector) back into a reduction.
    """
    if mask is None:
        return x.mean(axis=1)
    m = mask.astype(x.dtype)
    rows = jnp.stack([m, jnp.zeros_like(m)], axis=1)
    exact = jnp.finfo(x.dtype).bits <= 16  # products with 0 and 1 are exact at any precision
    total = jnp.einsum("bkt,btd->bkd", rows, x,
                       precision=None if exact else jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))[:, 0]
    count = jnp.maximum(mask.astype(total.dtype).sum(axis=1, keepdims=True), 1)
    return (total / count).astype(x.dtype)
