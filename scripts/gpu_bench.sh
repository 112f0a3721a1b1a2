#!/usr/bin/env bash
# The GPU measurement (docs/performance.md): mmjax's two benchmark configs and their PyTorch
# peers in one call, main numbers first, ablations last, each under `timeout` so one failure
# costs only its own line. Results go to $OUT/results.jsonl (one JSON object per run, or
# {"failed": ...}); stderr of each side to $OUT/jax.err / $OUT/torch.err.
#
# Run from the repository root on the device machine, after installing the carried wheels:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash scripts/gpu_bench.sh
set -u
OUT=${OUT:-/tmp/mmjax_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
R=$OUT/results.jsonl
B=${B:-256}
S=${S:-}      # S=:tiny and PEER_TINY=--tiny run the same script on a CPU in minutes
PEER_TINY=${PEER_TINY:-}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.total --format=csv
  python3 -c "import jax, jaxlib, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

# Fail fast (seconds, not minutes) if mmjax does not import under this image's packages.
python3 -c "import mmjax.benchmark, mmjax.trainer" 2> "$OUT/import.err" || { cat "$OUT/import.err"; exit 3; }

# XLA aborts on a flag it does not know: if this jax rejects mmjax's defaults, run without them.
DEFAULT_XLA_FLAGS=$(python3 -c "from mmjax.runtime import xla_flags; print(' '.join(xla_flags.DEFAULT_FLAGS))")
XLA_FLAGS="${XLA_FLAGS:-} $DEFAULT_XLA_FLAGS" \
  python3 -c "import jax.numpy as jnp; print(jnp.ones(3).sum())" > /dev/null 2>> "$OUT/import.err" \
  || { echo "default XLA flags rejected; MMJAX_NO_XLA_FLAGS=1" >> "$OUT/env.txt"; export MMJAX_NO_XLA_FLAGS=1; }

# The matmul ceiling on this card (random bf16 8192^3, 10 timed after 3).
timeout 60 python3 - "${MATMUL_N:-8192}" >> "$R" 2>> "$OUT/jax.err" <<'EOF'
import json, time, jax, jax.numpy as jnp
import sys; n = int(sys.argv[1])
ka, kb = jax.random.split(jax.random.key(0))
a = jax.random.normal(ka, (n, n), jnp.bfloat16); b = jax.random.normal(kb, (n, n), jnp.bfloat16)
f = jax.jit(lambda a, b: a @ b)
for _ in range(3): f(a, b).block_until_ready()
t = time.perf_counter()
for _ in range(10): out = f(a, b)
out.block_until_ready()
dt = (time.perf_counter() - t) / 10
print(json.dumps({"config": f"matmul_bf16_{n}", "ms": round(dt * 1e3, 3), "tflops_per_s": round(2 * n**3 / dt / 1e12, 1)}))
EOF

b() { timeout "$1" python3 -m mmjax.benchmark --batch_size "$B" --steps 20 --warmup 3 "${@:2}" >> "$R" 2>> "$OUT/jax.err" || echo "{\"failed\": \"mmjax $*\"}" >> "$R"; }
p() { timeout "$1" python3 scripts/bench_torch_peer.py --batch_size "$B" --steps 20 --warmup 5 $PEER_TINY "${@:2}" >> "$R" 2>> "$OUT/torch.err" || echo "{\"failed\": \"peer $*\"}" >> "$R"; }

# PARTS picks what runs, in this order (default: all): main = both configs and both peers;
# probe = scripts/dispatch_probe.py: host dispatch ms against the number of state arrays;
# mmjax = both configs only; peers_eager = both peers in eager mode only (the fusion goal's
#   reference; the compiled clip peer was slower than eager on the H200);
# mmjaxprof = both configs as configured (layers stacked and unrolled, scan_layers=True,
#   scan_unroll=0, and the opt-in model.gpu_rewrites on), each also tracing 5 steps after its
#   timing (--profile_steps: the summary joins the same JSON line; one process, one compile);
# plain / plain_fusion = clip / fusion with model.gpu_rewrites=False: the A/B of the rewrites;
# unrolled / unrolled_fusion = clip / fusion with scan_layers=False (the layout of the 2026-11-28
#   H200 measurement): the A/B of the stacked layout;
# scanloop = clip scanned as a loop (scan_unroll=1), profiled: what the H200-compiled step says
#   costs 38 GiB of zero-fill and 70 % more memory (docs/performance.md);
# scan = the same as mmjax plus clip under parallel.mode=mesh (plain jit, no pmap wrapper);
# mesh = both configs under jit over a one-device mesh (on a CPU it dispatched no faster);
# profile / profile_fusion = mmjax.profile_step: 5 steps traced, device time summed per kernel and
#   per category (matmul, attention, fusion, copy, ...) into $OUT/profile_*.jsonl (the trace
#   itself stays in /tmp: too big to bring back); PROFILE_ARGS adds overrides (e.g. scan_layers);
# gelu / nomerge / xla / flags = the ablations: tanh-GELU (with gpu_rewrites XLA can put it into
# the fc1 matmul's cuBLASLt epilogue), XLA's dot merger off (no merged text q/k/v matmuls), XLA
# attention instead of cuDNN, mmjax's two XLA flags off (all in docs/performance.md).
PARTS=${PARTS:-main plain gelu nomerge xla flags}
for part in $PARTS; do
  case $part in
    main)
      b 150 --config configs/clip_vitb16.py$S
      b 150 --config configs/fusion_vitb16_bert.py$S
      p 200 --workload clip --modes eager,compile
      p 120 --workload fusion --modes eager ;;
    probe) timeout 60 python3 scripts/dispatch_probe.py --leaves 100,400,1200,1600 >> "$R" 2>> "$OUT/jax.err" \
             || echo '{"failed": "probe"}' >> "$R" ;;
    mmjax)
      b 150 --config configs/clip_vitb16.py$S
      b 150 --config configs/fusion_vitb16_bert.py$S ;;
    peers_eager)
      p 120 --workload clip --modes eager
      p 120 --workload fusion --modes eager ;;
    gelu) b 150 --config configs/clip_vitb16.py$S --config.model.image.activation=gelu_tanh --config.model.text.activation=gelu_tanh ;;
    xla) b 150 --config configs/clip_vitb16.py$S --config.model.attn_implementation=xla ;;
    flags) XLA_FLAGS="--xla_gpu_enable_triton_gemm=true --xla_gpu_enable_latency_hiding_scheduler=false" b 150 --config configs/clip_vitb16.py$S ;;
    nomerge) XLA_FLAGS="--xla_gpu_dot_merger_threshold_mb=0" b 150 --config configs/clip_vitb16.py$S ;;
    plain) b 150 --config configs/clip_vitb16.py$S --config.model.gpu_rewrites=False ;;
    plain_fusion) b 150 --config configs/fusion_vitb16_bert.py$S --config.model.gpu_rewrites=False ;;
    scan) b 150 --config configs/clip_vitb16.py$S
          b 150 --config configs/fusion_vitb16_bert.py$S
          # pmap's Python wrapper is a fixed per-call cost that shows once the arrays are few
          b 150 --config configs/clip_vitb16.py$S --config.parallel.mode=mesh ;;
    mmjaxprof) b 180 --config configs/clip_vitb16.py$S --profile_steps 5
          b 180 --config configs/fusion_vitb16_bert.py$S --profile_steps 5 ;;
    unrolled) b 150 --config configs/clip_vitb16.py$S --config.model.scan_layers=False ;;
    unrolled_fusion) b 150 --config configs/fusion_vitb16_bert.py$S --config.model.scan_layers=False ;;
    scanloop) b 150 --config configs/clip_vitb16.py$S --config.model.scan_unroll=1 --profile_steps 5 ;;
    mesh) b 150 --config configs/clip_vitb16.py$S --config.parallel.mode=mesh
          b 150 --config configs/fusion_vitb16_bert.py$S --config.parallel.mode=mesh ;;
    profile|profile_fusion)
      cfg=configs/clip_vitb16.py; [ "$part" = profile_fusion ] && cfg=configs/fusion_vitb16_bert.py
      timeout 180 python3 -m mmjax.profile_step --config "$cfg$S" --batch_size "$B" --steps 5 \
        --top 60 --out "/tmp/mmjax_trace_$part" ${PROFILE_ARGS:-} > "$OUT/$part.jsonl" 2>> "$OUT/jax.err" \
        || echo "{\"failed\": \"$part\"}" >> "$R"
      tail -n 1 "$OUT/$part.jsonl" ;;
    fusion_compile) p 150 --workload fusion --modes compile ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
python3 - "$R" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    keys = ("config", "mode", "samples_per_s", "mfu", "step_ms_median", "step_ms_pipelined",
            "dispatch_ms_median", "state_leaves", "scan_layers", "scan_unroll", "gpu_rewrites", "compile_s",
            "peak_memory_gib", "attention", "tflops_per_s", "leaves", "us_per_leaf", "failed")
    print({k: d[k] for k in keys if k in d})
    if "profile" in d:
        prof = d["profile"]
        print("  profile:", {k: prof[k] for k in ("device_ms_per_step", "kernels_per_step",
                                                  "categories_ms_per_step")})
        for row in prof["top"][:8]:
            print("   ", row["ms_per_step"], row["calls_per_step"], row["name"][:90])
EOF
tail -n 15 "$OUT/jax.err" "$OUT/torch.err"
