r"""PyTorch peers of mmjax's benchmark workloads, timed the same way, printing the same JSON.

    python scripts/bench_torch_peer.py --workload clip --batch_size 256            # GPU
    python scripts/bench_torch_peer.py --workload fusion --batch_size 256          # GPU
    python scripts/bench_torch_peer.py --workload clip --tiny --modes eager        # CPU test

Why it exists: a samples/s figure means little alone; what matters is its ratio to PyTorch run on
the same GPU in the same run (docs/performance.md). The peers are what a PyTorch user would write
with transformers' models:

* ``clip``: ``ViTModel`` (B/16, 224 px, class token, 197 tokens) + ``CLIPTextModel`` (width 512,
  8 heads, 12 layers, 77 tokens, causal), 512-d projections without bias, a learnt temperature,
  the symmetric contrastive loss;
* ``fusion``: ``ViTModel`` + ``BertModel`` (base, 64 tokens) + two pre-LN co-attention layers
  (each stream: self-attention, cross-attention to the other stream, MLP; as mmjax's
  ``co_attention``), a 3129-way classifier on the two streams' concatenated masked means and a
  256-d contrastive loss on the towers' pooled features, total = CE + 0.5·contrastive.

Both use SDPA attention, AdamW (fused on CUDA) after global-norm clipping at 1.0, float32
params under ``torch.autocast(bfloat16)``, one synthetic batch made on the device once (random,
not zeros), and each timed step ends with ``torch.cuda.synchronize()``. ``--modes`` runs
``eager`` and/or ``compile`` (``torch.compile`` of the model's loss; the optimizer step stays
eager). Each mode prints one JSON line with mmjax.benchmark's fields; ``tflops_per_step`` is
mmjax.perf.flops' analytic count for the peer's own shapes (197 image tokens, 77 CLIP text tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The FLOP count comes from mmjax (pure arithmetic); keep JAX off the GPU torch is timing.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    ViTConfig,
    ViTModel,
)

HOPPER_PEAK_TFLOPS = 989.0


def _contrastive(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss on L2-normalised embeddings, the multiplier clamped at 100."""
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _vit(tiny: bool) -> ViTModel:
    if tiny:
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, image_size=32, patch_size=8)
    else:
        cfg = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, image_size=224, patch_size=16)
    cfg._attn_implementation = "sdpa"
    return ViTModel(cfg, add_pooling_layer=False)


class ClipPeer(nn.Module):
    def __init__(self, tiny: bool):
        super().__init__()
        self.vision = _vit(tiny)
        if tiny:
            tcfg = CLIPTextConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=16, hidden_act="gelu",
                                  bos_token_id=254, eos_token_id=255, pad_token_id=0)
        else:
            tcfg = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                                  num_hidden_layers=12, num_attention_heads=8,
                                  max_position_embeddings=77, hidden_act="gelu")
        tcfg._attn_implementation = "sdpa"
        self.text = CLIPTextModel(tcfg)
        embed = 16 if tiny else 512
        self.image_proj = nn.Linear(self.vision.config.hidden_size, embed, bias=False)
        self.text_proj = nn.Linear(tcfg.hidden_size, embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        img = self.vision(pixel_values=batch["image"]).last_hidden_state[:, 0]
        txt = self.text(input_ids=batch["ids"], attention_mask=batch["mask"]).pooler_output
        return _contrastive(self.image_proj(img), self.text_proj(txt), self.logit_scale)


class CoAttentionLayer(nn.Module):
    """Pre-LN self-attention, cross-attention to the other stream, MLP (mmjax's Block)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norms = nn.ModuleList(nn.LayerNorm(width, eps=1e-6) for _ in range(3))
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.cq = nn.Linear(width, width)
        self.ckv = nn.Linear(width, 2 * width)
        self.cout = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor,
                ctx_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norms[0](x)).chunk(3, dim=-1)
        keys = mask[:, None, None, :].bool()
        a = F.scaled_dot_product_attention(
            self._split(q), self._split(k), self._split(v), attn_mask=keys
        )
        x = x + self.out(self._merge(a))
        q = self.cq(self.norms[1](x))
        k, v = self.ckv(ctx).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(
            self._split(q), self._split(k), self._split(v),
            attn_mask=ctx_mask[:, None, None, :].bool(),
        )
        x = x + self.cout(self._merge(a))
        return x + self.mlp(self.norms[2](x))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class FusionPeer(nn.Module):
    def __init__(self, tiny: bool):
        super().__init__()
        self.vision = _vit(tiny)
        if tiny:
            bcfg = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=16)
            width, heads, mlp, classes, embed = 32, 2, 64, 10, 16
        else:
            bcfg = BertConfig()  # BERT-base: 768 wide, 12 layers, 12 heads, MLP 3072
            width, heads, mlp, classes, embed = 768, 12, 3072, 3129, 256
        bcfg._attn_implementation = "sdpa"
        self.text = BertModel(bcfg)
        d_img, d_txt = self.vision.config.hidden_size, bcfg.hidden_size
        self.image_in = nn.Linear(d_img, width)
        self.text_in = nn.Linear(d_txt, width)
        self.image_layers = nn.ModuleList(CoAttentionLayer(width, heads, mlp) for _ in range(2))
        self.text_layers = nn.ModuleList(CoAttentionLayer(width, heads, mlp) for _ in range(2))
        self.image_norm = nn.LayerNorm(width, eps=1e-6)
        self.text_norm = nn.LayerNorm(width, eps=1e-6)
        self.classifier = nn.Linear(2 * width, classes)
        self.image_proj = nn.Linear(d_img, embed, bias=False)
        self.text_proj = nn.Linear(d_txt, embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        img_tokens = self.vision(pixel_values=batch["image"]).last_hidden_state
        text_out = self.text(input_ids=batch["ids"], attention_mask=batch["mask"])
        img_mask = torch.ones(img_tokens.shape[:2], device=img_tokens.device, dtype=torch.long)
        txt_mask = batch["mask"]
        xa, xb = self.image_in(img_tokens), self.text_in(text_out.last_hidden_state)
        for la, lb in zip(self.image_layers, self.text_layers, strict=True):
            xa, xb = la(xa, img_mask, xb, txt_mask), lb(xb, txt_mask, xa, img_mask)
        pooled = torch.cat(
            [_masked_mean(self.image_norm(xa), img_mask),
             _masked_mean(self.text_norm(xb), txt_mask)], dim=-1,
        )
        answer = F.cross_entropy(self.classifier(pooled).float(), batch["label"])
        itc = _contrastive(self.image_proj(img_tokens.mean(1)),
                           self.text_proj(text_out.pooler_output), self.logit_scale)
        return answer + 0.5 * itc


def synthetic_batch(workload: str, tiny: bool, batch_size: int, device: torch.device,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images, token ids with a padding mask, and labels, made on the device once."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = 32 if tiny else 224
    length = 16 if tiny else (77 if workload == "clip" else 64)
    vocab = 256 if tiny else (49408 if workload == "clip" else 30522)
    lengths = torch.randint(max(length // 2, 1), length + 1, (batch_size,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab - 1, (batch_size, length), generator=g) * mask
    if workload == "clip":  # CLIP pools at the end-of-text token: the vocabulary's last id
        ids[torch.arange(batch_size), lengths - 1] = vocab - 1
    batch = {
        "image": torch.randn(batch_size, 3, size, size, generator=g),
        "ids": ids,
        "mask": mask,
        "label": torch.randint(0, 10 if tiny else 3129, (batch_size,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def analytic_flops(workload: str, tiny: bool, batch_size: int) -> float:
    """mmjax.perf.flops' training count for the peer's shapes (class token, 77 tokens), TFLOP."""
    from mmjax import config as config_lib
    from mmjax.perf import flops

    name = "clip_vitb16.py" if workload == "clip" else "fusion_vitb16_bert.py"
    module = config_lib.load_file(ROOT / "configs" / name)
    config = module.get_config("tiny" if tiny else None)
    with config.unlocked():
        config.model.encoders.image.class_token = True
        if workload == "clip" and not tiny:
            config.data.max_len = 77
    return flops.model_flops(config, device_batch=batch_size)["train"] * batch_size / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(workload: str, mode: str, *, tiny: bool, batch_size: int, steps: int, warmup: int,
        peak_tflops: float) -> dict[str, Any]:
    """Times ``steps`` optimizer steps after ``warmup`` ones; returns the JSON report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = (ClipPeer if workload == "clip" else FusionPeer)(tiny).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=device.type == "cuda")
    loss_fn = torch.compile(model) if mode == "compile" else model
    batch = synthetic_batch(workload, tiny, batch_size, device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    loss_value = float(loss)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss {loss_value} in the {mode} peer")
    step_s = statistics.median(times)
    tflops = analytic_flops(workload, tiny, batch_size)
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops or (HOPPER_PEAK_TFLOPS if ("H100" in kind or "H200" in kind) else None)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "config": f"torch_peer:{workload}{':tiny' if tiny else ''}:{mode}",
        "backend": device.type,
        "device_kind": kind,
        "devices": 1,
        "batch_size": batch_size,
        "per_device_batch": batch_size,
        "steps": steps,
        "step_ms_median": round(step_s * 1e3, 3),
        "step_ms_min": round(min(times) * 1e3, 3),
        "step_ms_max": round(max(times) * 1e3, 3),
        "samples_per_s": round(batch_size / step_s, 2),
        "tflops_per_step": float(f"{tflops:.5g}"),
        "gflops_per_sample": float(f"{tflops * 1e3 / batch_size:.5g}"),
        "tflops_per_s": float(f"{tflops / step_s:.5g}"),
        "mfu": None if peak is None else round(tflops / step_s / peak, 4),
        "peak_tflops_per_device": peak,
        "peak_memory_gib": None if mem is None else round(mem, 3),
        "compile_s": round(compile_s, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "loss": loss_value,
        "dtype": "bfloat16 autocast",
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("clip", "fusion"), default="clip")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--batch_size", type=int, default=0, help="0 = 256, or 8 with --tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--tiny", action="store_true", help="tiny models for a CPU test")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"eager", "compile"}:
        p.error(f"--modes={args.modes!r}: use eager and/or compile")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")
    batch_size = args.batch_size or (8 if args.tiny else 256)
    for mode in modes:
        report = run(args.workload, mode, tiny=args.tiny, batch_size=batch_size,
                     steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the repo's error contract: last stderr line names the failure
        import traceback

        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
