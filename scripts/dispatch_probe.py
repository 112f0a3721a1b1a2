"""Host dispatch time of a jitted step against the number of arrays it takes (docs/performance.md).

    python scripts/dispatch_probe.py [--leaves 100,400,1200] [--steps 20]

A trivial update (every leaf scaled, plus one reduction) of N small float32 arrays, donated as a
train state is: the work is negligible, so the time until the call returns is the host's cost of
handing N arrays to the executable. Prints one JSON line per N with the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def dispatch_ms(n: int, steps: int) -> float:
    """Median host time (ms) of calling a donated jitted update of ``n`` [32, 32] arrays."""
    tree = {f"p{i}": jnp.full((32, 32), float(i)) for i in range(n)}
    x = jnp.arange(8.0)

    def step(t: dict, v: jax.Array) -> tuple[dict, jax.Array]:
        return jax.tree.map(lambda a: a * 1.0001 + v.sum(), t), v.sum()

    fn = jax.jit(step, donate_argnums=(0,))
    for _ in range(3):
        tree, _ = jax.block_until_ready(fn(tree, x))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn(tree, x)
        times.append(time.perf_counter() - t0)
        tree, _ = jax.block_until_ready(out)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", default="100,400,1200")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    for n in (int(v) for v in args.leaves.split(",")):
        ms = dispatch_ms(n, args.steps)
        print(json.dumps({"leaves": n, "dispatch_ms_median": round(ms, 3),
                          "us_per_leaf": round(ms * 1e3 / n, 2), "backend": jax.default_backend(),
                          "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
    main()
