"""Weight tables: one entry per Hugging Face tensor, mapping it onto one mmjax variable.

An entry holds the HF name, the mmjax variable path and a pair of exact, inverse transforms
(Linear kernels transposed, conv OIHW↔HWIO, q/k/v split into ``[D, heads, head_dim]``), so every
tensor is accounted for in both directions. The helpers below build the entries of the layers
the architectures share (Linear, LayerNorm, attention heads, a transformer block, a conv).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Path = tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """One HF tensor ↔ one mmjax variable; ``to_mm``/``to_hf`` are exact inverses."""

    hf: str
    mm: Path
    to_mm: Callable[[Any], Any]
    to_hf: Callable[[Any], Any]


def same(x: Any) -> Any:
    return x


def transpose(x: Any) -> Any:
    return x.T


def under(prefix: Path, entries: Sequence[Entry]) -> list[Entry]:
    """``entries`` with ``prefix`` (e.g. the collection, ``("params",)``) before each mmjax path."""
    return [Entry(e.hf, (*prefix, *e.mm), e.to_mm, e.to_hf) for e in entries]


def linear(hf: str, mm: Path, bias: bool = True) -> list[Entry]:
    """nn.Linear weight ``[out, in]`` ↔ Dense kernel ``[in, out]``."""
    out = [Entry(f"{hf}.weight", (*mm, "kernel"), transpose, transpose)]
    if bias:
        out.append(Entry(f"{hf}.bias", (*mm, "bias"), same, same))
    return out


def norm(hf: str, mm: Path) -> list[Entry]:
    """LayerNorm weight/bias ↔ scale/bias."""
    return [Entry(f"{hf}.weight", (*mm, "scale"), same, same),
            Entry(f"{hf}.bias", (*mm, "bias"), same, same)]


def heads_in(hf: str, mm: Path, heads: int, bias: bool) -> list[Entry]:
    """q/k/v Linear [H*hd, D] → DenseGeneral kernel [D, H, hd] (and bias [H, hd])."""
    out = [Entry(
        f"{hf}.weight", (*mm, "kernel"),
        lambda w: w.T.reshape(w.shape[1], heads, w.shape[0] // heads),
        lambda k: k.reshape(k.shape[0], -1).T,
    )]
    if bias:
        out.append(Entry(f"{hf}.bias", (*mm, "bias"), lambda b: b.reshape(heads, -1),
                         lambda b: b.reshape(-1)))
    return out


def heads_out(hf: str, mm: Path, heads: int) -> list[Entry]:
    """Output Linear [D, H*hd] → DenseGeneral kernel [H, hd, D]."""
    return [
        Entry(f"{hf}.weight", (*mm, "kernel"),
              lambda w: w.T.reshape(heads, w.shape[1] // heads, w.shape[0]),
              lambda k: k.reshape(-1, k.shape[-1]).T),
        Entry(f"{hf}.bias", (*mm, "bias"), same, same),
    ]


def block(hf: str, mm: Path, names: Mapping[str, str], heads: int,
          qkv_bias: bool) -> list[Entry]:
    """One mmjax transformer ``Block``; ``names`` gives each sublayer's HF name below ``hf``.

    Keys of ``names``: query, key, value, out (attention), attn_norm, fc1, fc2, mlp_norm.
    """
    out: list[Entry] = []
    for part in ("query", "key", "value"):
        out += heads_in(f"{hf}.{names[part]}", (*mm, "attn", part), heads, qkv_bias)
    out += heads_out(f"{hf}.{names['out']}", (*mm, "attn", "out"), heads)
    out += norm(f"{hf}.{names['attn_norm']}", (*mm, "attn_norm"))
    out += linear(f"{hf}.{names['fc1']}", (*mm, "mlp", "fc1"))
    out += linear(f"{hf}.{names['fc2']}", (*mm, "mlp", "fc2"))
    out += norm(f"{hf}.{names['mlp_norm']}", (*mm, "mlp_norm"))
    return out


def conv(hf: str, mm: Path, bias: bool) -> list[Entry]:
    """Conv2d weight OIHW ↔ flax HWIO."""
    out = [Entry(f"{hf}.weight", (*mm, "kernel"), lambda w: w.transpose(2, 3, 1, 0),
                 lambda k: k.transpose(3, 2, 0, 1))]
    if bias:
        out.append(Entry(f"{hf}.bias", (*mm, "bias"), same, same))
    return out
