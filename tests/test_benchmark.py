"""The benchmark on the CPU: the CLI's JSON, the FLOP count against a hand count and XLA's
cost analysis, where "auto" attention picks cuDNN, the XLA flags, the torch peer.

Tiny variants only. The CLI runs are subprocesses; the two mmjax.benchmark runs start together in
one test (so one xdist worker runs both, and their compilations overlap), the PyTorch peer in
another. The cuDNN-versus-XLA comparison runs only on a GPU.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip_vitb16, fusion_vitb16_bert
from mmjax.models import layers
from mmjax.models.multimodal import build_model
from mmjax.perf import flops
from mmjax.perf.step import synthetic_batch
from mmjax.runtime import xla_flags

ROOT = Path(__file__).resolve().parents[1]

FIELDS = {"config", "devices", "batch_size", "step_ms_median", "samples_per_s",
          "tflops_per_step", "mfu", "peak_memory_gib"}


_COMMANDS = {
    "bench": ["-m", "mmjax.benchmark", "--config", "configs/clip_vitb16.py:tiny", "--steps", "3",
              "--warmup", "1"],
    "unrolled": ["-m", "mmjax.benchmark", "--config", "configs/clip_vitb16.py:tiny",
                 "--config.model.scan_layers=False", "--steps", "2", "--warmup", "1",
                 "--profile_steps", "2"],
    "peer": ["scripts/bench_torch_peer.py", "--workload", "clip", "--tiny", "--modes", "eager",
             "--steps", "2", "--warmup", "1"],
}


def _run_all(*names: str) -> list[dict]:
    """Starts the named CLI runs together, waits for them; each one's single JSON report."""
    # XLA_FLAGS keeps conftest's compile-speed flags (the numbers are not under test) and names
    # none of mmjax.runtime.xla_flags' defaults, which the CLI then adds.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    started = [subprocess.Popen([sys.executable, *_COMMANDS[n]], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for n in names]
    reports = []
    try:
        for proc in started:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            (report,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            reports.append(report)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
    return reports


# ---------------------------------------------------------------- FLOPs, counted by hand
#
# One multiply-add = 2 FLOPs. A transformer layer over T tokens of width D with MLP width M:
# query/key/value/output projections 4·2·T·D², the two MLP matrices 2·2·T·D·M, QKᵀ and the
# weighted sum of V 2·2·T²·D. A cross-attention sublayer, Tq queries over Tk keys: query and
# output projections 2·2·Tq·D², key and value 2·2·Tk·D², QKᵀ and AV 2·2·Tq·Tk·D.


def _layer(t: int, d: int, m: int) -> int:
    return 8 * t * d * d + 4 * t * d * m + 4 * t * t * d


def _cross(tq: int, tk: int, d: int) -> int:
    return 4 * tq * d * d + 4 * tk * d * d + 4 * tq * tk * d


def _tiny_clip_count() -> dict[str, int]:
    # Image: 32 px, patch 8 -> 16 tokens; text 16 tokens; both width 32, MLP 64, 2 layers.
    patch = 2 * 16 * (8 * 8 * 3) * 32
    head = 2 * 32 * 16 * 2 + 2 * 8 * 16  # two projections to 16-d, 8x8 logits per example
    image, text = patch + 2 * _layer(16, 32, 64), 2 * _layer(16, 32, 64)
    return {"image": image, "text": text, "heads": head, "train": 3 * (image + text + head)}


def test_flops_match_a_hand_count_for_tiny_clip():
    count = flops.model_flops(clip_vitb16.get_config("tiny"))
    want = _tiny_clip_count()
    assert {k: count[k] for k in want} == want
    assert count["fusion"] == 0


def test_flops_match_a_hand_count_for_tiny_fusion():
    layer = _layer(16, 32, 64)
    proj = 2 * (2 * 16 * 32 * 32)  # both streams projected to the fusion width
    count = flops.model_flops(fusion_vitb16_bert.get_config("tiny"))
    assert count["text"] == 2 * layer + 2 * 32 * 32  # BERT's pooler
    # two co-attention layers, each stream: self-attention + MLP, and cross-attention (16 x 16)
    assert count["fusion"] == proj + 2 * 2 * (layer + _cross(16, 16, 32))
    # answer: 10 classes from both streams' pooled features (2 x 32); itc: two 16-d
    # projections and the 8 x 8 logits
    assert count["heads"] == 2 * 64 * 10 + 2 * 32 * 16 * 2 + 2 * 8 * 16


def test_full_size_counts():
    """CLIP B/16 lands on the ~124 GFLOP/sample that torch's FLOP counter reports for open_clip's
    ViT-B-16 (197 and 77 tokens; 196 and 80 here); the fusion workload matches its hand count."""
    clip = flops.model_flops(clip_vitb16.get_config())["train"] / 1e9
    assert clip == pytest.approx(124, rel=0.02)

    d, m = 768, 3072
    image = 2 * 196 * (16 * 16 * 3) * d + 12 * _layer(196, d, m)  # ViT-B/16 at 224 px
    text = 12 * _layer(64, d, m) + 2 * d * d  # BERT-base on 64 tokens, tanh pooler
    fusion = 2 * 196 * d * d + 2 * 64 * d * d + 2 * (  # projections, 2 co-attention layers
        _layer(196, d, m) + _cross(196, 64, d) + _layer(64, d, m) + _cross(64, 196, d))
    heads = 2 * 2 * d * 3129 + 2 * 2 * d * 256 + 2 * 256 * 256  # answer, itc, 256x256 logits
    count = flops.model_flops(fusion_vitb16_bert.get_config())
    assert count == {"image": image, "text": text, "fusion": fusion, "heads": heads,
                     "forward": image + text + fusion + heads,
                     "train": 3 * (image + text + fusion + heads)}


def test_flops_agree_with_xla_cost_analysis():
    """XLA counts every op of the compiled forward, so it sits above the matmul-only count, by
    less at larger widths.

    At width 128 the measured ratio was 1.09 (1.32 at width 32, where elementwise ops weigh
    more); the bound [1, 1.2] catches a missing or doubled matmul term.
    """
    c = clip_vitb16.get_config("tiny")
    with c.unlocked():
        c.model.dtype = "float32"
        for tower in ("image", "text"):
            c.model.encoders[tower].update({"width": 128, "mlp_dim": 512})
    model = build_model(c.model)
    batch = synthetic_batch(c, c.batch_size)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), batch)
    cost = jax.jit(model.apply).lower(params, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / (flops.model_flops(c)["forward"] * c.batch_size)
    assert 1.0 <= ratio <= 1.2, ratio


# ------------------------------------------------------------------- attention backend


def test_auto_attention_resolves_to_cudnn_only_where_it_fits():
    bf16 = jnp.bfloat16
    assert layers.resolve_attention(bf16, 196, 196, 64, backend="gpu") == "cudnn"
    assert layers.resolve_attention(bf16, 80, 80, 64, backend="gpu") == "cudnn"
    assert layers.resolve_attention(jnp.float16, 80, 64, 128, backend="gpu") == "cudnn"
    assert layers.resolve_attention(bf16, 197, 197, 64, backend="gpu") is None  # odd length
    assert layers.resolve_attention(bf16, 77, 77, 64, backend="gpu") is None
    assert layers.resolve_attention(bf16, 196, 196, 60, backend="gpu") is None  # head % 8
    assert layers.resolve_attention(bf16, 196, 196, 256, backend="gpu") is None  # head > 128
    assert layers.resolve_attention(jnp.float32, 196, 196, 64, backend="gpu") is None
    assert layers.resolve_attention(bf16, 196, 196, 64, backend="cpu") is None


@pytest.mark.parametrize("module", [clip_vitb16, fusion_vitb16_bert])
def test_full_configs_get_cudnn_attention_on_a_gpu(module):
    """What the benchmark configs' deviations from their references are for (no class token,
    text padded to an even length): on a GPU "auto" picks cuDNN for every tower's shapes."""
    c = module.get_config()
    assert c.model.attn_implementation == "auto"
    for name in ("image", "text"):
        enc = c.model.encoders[name]
        size = layers.tower_sizes(enc.variant, **{k: enc.get(k) for k in (
            "width", "depth", "mlp_dim", "num_heads", "patch_size")})
        if enc.kind == "vit":
            tokens = (c.data.image_size // size["patch_size"]) ** 2
            tokens += int(enc.get("class_token", False))
        else:
            tokens = c.data.max_len
        head_dim = size["width"] // size["num_heads"]
        dtype = layers.DTYPES[c.model.dtype]
        assert layers.resolve_attention(dtype, tokens, tokens, head_dim, "gpu") == "cudnn", name


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_attention_matches_xla_on_a_gpu(causal):
    """On a GPU, "auto" runs cuDNN's fused kernel: it must compute XLA's attention (bfloat16,
    padded keys), both within bfloat16 rounding of a float32 reference."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 64, 128)), jnp.bfloat16)
    lengths = np.array([64, 40, 17, 2])
    mask = jnp.asarray((np.arange(64)[None] < lengths[:, None])[:, None, None, :])
    make = lambda impl, dtype: layers.Attention(
        num_heads=2, causal=causal,
        opts=layers.Options(dtype=dtype, attn_implementation=impl))
    params = make(None, jnp.float32).init(jax.random.key(0), x, mask=mask)
    assert layers.resolve_attention(jnp.bfloat16, 64, 64, 64) == "cudnn"
    run = jax.jit(lambda p: [make(i, d).apply(p, x, mask=mask).astype(jnp.float32)
                             for i, d in (("auto", jnp.bfloat16), (None, jnp.bfloat16),
                                          (None, jnp.float32))])
    cudnn, xla, ref = (np.asarray(y) for y in run(params))
    np.testing.assert_allclose(cudnn, ref, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(xla, ref, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(cudnn, xla, rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------- configs, flags


def test_fusion_tiny_builds_with_synthetic_batch():
    c = fusion_vitb16_bert.get_config("tiny")
    batch = synthetic_batch(c, 4)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["text"]["ids"].shape == (4, 16)
    assert batch["label"].max() < 10 and batch["text"]["mask"][:, 0].all()
    model = build_model(c.model)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), batch)
    out = jax.eval_shape(model.apply, params, batch)
    assert out["answer"]["logits"].shape == (4, 10)
    assert out["itc"]["image_embeds"].shape == (4, 16)


def test_configs_are_locked_and_check_arguments():
    for module in (clip_vitb16, fusion_vitb16_bert):
        c = module.get_config()
        with pytest.raises(AttributeError):
            c.model.nope = 1
        with pytest.raises(ValueError, match="unknown argument 'huge'"):
            module.get_config("huge")


def test_xla_flags_keep_the_users_choice():
    triton = "--xla_gpu_enable_triton_gemm"
    env = {"XLA_FLAGS": f"{triton}=true --foo=1"}
    added = xla_flags.apply_default_flags(environ=env)
    assert added == [f for f in xla_flags.DEFAULT_FLAGS if not f.startswith(triton)]
    flags = env["XLA_FLAGS"].split()
    assert f"{triton}=true" in flags and f"{triton}=false" not in flags and "--foo=1" in flags
    assert all(f in flags for f in added)
    assert xla_flags.apply_default_flags(environ=env) == []  # idempotent
    empty: dict[str, str] = {}
    assert xla_flags.apply_default_flags(environ=empty) == list(xla_flags.DEFAULT_FLAGS)
    assert empty["XLA_FLAGS"].split() == list(xla_flags.DEFAULT_FLAGS)
    off = {"MMJAX_NO_XLA_FLAGS": "1"}
    assert xla_flags.apply_default_flags(environ=off) == [] and "XLA_FLAGS" not in off


@pytest.mark.slow
def test_cli_reports_scanned_and_unrolled_runs():
    """The JSON line of a run of the (scanned) tiny CLIP config, and of the same config unrolled
    with --profile_steps, which traces steps of the already compiled step in the same process."""
    report, unrolled = _run_all("bench", "unrolled")
    assert set(report) >= FIELDS
    assert report["config"] == "configs/clip_vitb16.py:tiny"
    assert report["devices"] == 1 and report["batch_size"] == 8
    assert report["step_ms_median"] > 0 and report["samples_per_s"] > 0
    assert np.isfinite(report["loss"])
    # the hand count of a train step: 8 examples (the report keeps 5 significant figures)
    assert report["tflops_per_step"] == pytest.approx(_tiny_clip_count()["train"] * 8 / 1e12,
                                                      rel=1e-4)
    assert report["mfu"] is None  # a CPU has no default peak
    assert report["xla_flags_added"] == list(xla_flags.DEFAULT_FLAGS)  # none set by the test
    assert report["xla_flags"].split()[-len(xla_flags.DEFAULT_FLAGS):] == list(
        xla_flags.DEFAULT_FLAGS)
    assert report["attention"] == {"image": "xla (16 tokens)", "text": "xla (16 tokens)"}
    assert report["gpu_rewrites"] is clip_vitb16.get_config("tiny").model.gpu_rewrites

    # The config's scanned towers (two layers each) hold fewer arrays than the same towers
    # unrolled: layers are stacked, not listed.
    assert report["scan_layers"] is True and unrolled["scan_layers"] is False
    assert report["scan_unroll"] == 0
    assert report["state_leaves"] < unrolled["state_leaves"]
    assert report["params"] == unrolled["params"]
    assert np.isfinite(unrolled["loss"]) and unrolled["samples_per_s"] > 0
    assert "profile" not in report  # --profile_steps 0 (the default) traces nothing

    prof = unrolled["profile"]
    assert prof["steps"] == 2 and prof["device_ms_per_step"] > 0 and prof["kernels_per_step"] > 0
    assert prof["device_tracks"] is False  # a CPU: host tracks only
    assert sum(prof["categories_ms_per_step"].values()) == pytest.approx(
        prof["device_ms_per_step"], rel=1e-6)
    top = prof["top"]
    assert 0 < len(top) <= 15 and top == sorted(top, key=lambda r: -r["ms_per_step"])
    assert Path(prof["trace"]).name == "perfetto_trace.json.gz" and Path(prof["trace"]).is_file()


@pytest.mark.slow
def test_torch_peer_prints_the_same_fields():
    (report,) = _run_all("peer")
    assert set(report) >= FIELDS
    assert report["config"] == "torch_peer:clip:tiny:eager"
    assert report["batch_size"] == 8 and report["samples_per_s"] > 0
    assert np.isfinite(report["loss"])
