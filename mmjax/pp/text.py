"""Text preprocessing ops: tokenize, pad_truncate."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmjax.pp.ops import Context, Example, OpFn, register


@register("tokenize")
def _tokenize(ctx: Context, max_len: int = 0, key: str = "text") -> OpFn:
    """text → ``{"ids", "mask"}`` of length ``max_len`` (padded and truncated by the tokenizer)."""
    max_len = max_len or ctx.max_len

    def fn(ex: Example, rng: Any) -> Example:
        if ctx.tokenizer is None:
            raise ValueError("preprocessing op 'tokenize' needs a tokenizer")
        value = ex[key]
        if isinstance(value, dict):
            return ex
        ids, mask = ctx.tokenizer.encode([str(value)], max_len)
        return {**ex, key: {"ids": ids[0], "mask": mask[0]}}

    return fn


@register("pad_truncate")
def _pad_truncate(ctx: Context, length: int = 0, key: str = "text") -> OpFn:
    """Re-fits tokenized text to ``length`` (e.g. to a multiple of 8 for fused attention)."""
    length = length or ctx.max_len

    def fn(ex: Example, rng: Any) -> Example:
        out = {}
        for k, v in ex[key].items():
            row = np.zeros(length, np.int32)
            row[: min(length, len(v))] = v[:length]
            out[k] = row
        return {**ex, key: out}

    return fn
