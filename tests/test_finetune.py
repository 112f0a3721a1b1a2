"""Fine-tuning features: config.init_from, layer-wise lr decay, LoRA, freezing with the trainer.

Real Orbax checkpoints on disk, fresh random inputs, explicit tolerances. To stay cheap on a
2-core CPU, parameter trees come from ``jax.eval_shape(model.init)`` filled with numpy values,
and a single test builds a state through ``loop.initial_state`` and compiles ``train_step``.
"""

from __future__ import annotations

import functools
import json
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs.default import get_config
from mmjax import trainer
from mmjax.io.checkpoint import Checkpointer, write_checkpoint
from mmjax.models.multimodal import build_model
from mmjax.models.paths import path_str
from mmjax.optim import lora, optimizers
from mmjax.perf.step import synthetic_batch
from mmjax.trainer import loop, transfer
from mmjax.trainer import step as step_lib


def _leaves(tree) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _first_update(tx, grads, params) -> dict:
    """The first update of ``tx``, as numpy ``{path: array}`` (init and update in one compile)."""
    fn = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
    return _leaves(jax.device_get(fn(grads, params)))


def _random_like(shapes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


MODEL = {
    "encoders": {
        "image": {"kind": "vit", "variant": "mu/8", "width": 8, "depth": 2, "num_heads": 2,
                  "mlp_dim": 16, "class_token": True, "pool": "cls", "pooler": True},
        "text": {"kind": "text", "vocab_size": 11, "width": 8, "depth": 1, "num_heads": 2,
                 "mlp_dim": 16, "max_len": 6, "pooler": True},
    },
    "fusion": {"kind": "cross_attention", "width": 8, "depth": 1, "num_heads": 2},
    "heads": {"answer": {"kind": "classification", "num_classes": 3}},
}


@functools.cache
def _model_shapes() -> dict:
    """Param shapes of a real ViT (depth 2) + TextEncoder (depth 1) + fusion + head model."""
    model = build_model(MODEL)
    batch = {"image": jnp.zeros((1, 16, 16, 3)),
             "text": {"ids": jnp.ones((1, 6), jnp.int32), "mask": jnp.ones((1, 6), jnp.int32)}}
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(
        lambda: model.init({"params": key, "dropout": key}, batch, train=False)
    )["params"]


# ------------------------------------------------------------------------------------------
# config.init_from


def _tiny_tree(rng: np.random.Generator, classes: int) -> dict:
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "image": {"embedding": {"kernel": f(3, 4)},
                  "encoder": {"layer_0": {"mlp": {"fc1": {"kernel": f(4, 8), "bias": f(8)}}}}},
        "text": {"token_embedding": {"embedding": f(10, 4)}},
        "fusion": {"proj": {"kernel": f(4, 4)}},
        "heads": {"clip": {"scale": f()}, "answer": {"out": {"kernel": f(4, classes)}}},
    }


def _init_config(init_from: str, subtrees: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "init_from": init_from, "init_subtrees": subtrees,
        "model": {"image": {"kind": "vit", "init_from": ""}, "text": {"kind": "text"},
                  "fusion": {"kind": "cross_attention"}, "heads": {}},
    })


def test_config_init_from_loads_subtrees_and_reports(tmp_path, caplog):
    rng = np.random.default_rng(0)
    fresh = _tiny_tree(rng, classes=5)
    source = _tiny_tree(rng, classes=3)  # another task's head: a different number of classes
    del source["image"]["encoder"]["layer_0"]["mlp"]["fc1"]["bias"]  # missing from the source
    source["image"]["encoder"]["layer_1"] = {"mlp": {"fc1": {"kernel": rng.normal(size=(4, 8))}}}
    write_checkpoint(tmp_path / "src", source, step=7)

    fresh_flat, src_flat = _leaves(fresh), _leaves(source)
    for where in ("src", "src/checkpoints/7", "src/checkpoints/7/state"):
        out, report = transfer.load_subtrees(tmp_path / where, fresh)
        assert report.loaded == {"image": 2, "text": 1, "fusion": 1}
        assert report.missing == ["image/encoder/layer_0/mlp/fc1/bias"]
        assert report.unexpected == ["image/encoder/layer_1/mlp/fc1/kernel"]
        got = _leaves(out)
        assert sorted(got) == sorted(fresh_flat)  # the model's structure, nothing added
        for k, v in got.items():
            from_source = k.split("/")[0] != "heads" and k not in report.missing
            np.testing.assert_array_equal(v, src_flat[k] if from_source else fresh_flat[k],
                                          err_msg=k)
            assert v.dtype == np.float32

    # The config entry point; a listed nested subtree ("heads/clip") and a top-level one only.
    caplog.set_level(logging.INFO)
    out = transfer.apply_config_init_from(_init_config(str(tmp_path / "src"), "image,heads/clip"),
                                          fresh, logging.getLogger("test"))
    got = _leaves(out)
    np.testing.assert_array_equal(got["heads/clip/scale"], src_flat["heads/clip/scale"])
    np.testing.assert_array_equal(got["image/embedding/kernel"], src_flat["image/embedding/kernel"])
    for k in ("text/token_embedding/embedding", "fusion/proj/kernel", "heads/answer/out/kernel"):
        np.testing.assert_array_equal(got[k], fresh_flat[k])
    text = caplog.text
    assert "loaded leaves {image: 2, heads/clip: 1}" in text
    assert "1 missing (kept fresh): image/encoder/layer_0/mlp/fc1/bias" in text
    assert "1 unexpected (ignored): image/encoder/layer_1/mlp/fc1/kernel" in text
    # Without init_from nothing is read.
    out = transfer.apply_config_init_from(_init_config(""), fresh)
    assert out.keys() == fresh.keys() and all(out[k] is fresh[k] for k in fresh)


def test_config_init_from_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(1)
    fresh = _tiny_tree(rng, classes=5)
    write_checkpoint(tmp_path / "src", _tiny_tree(rng, classes=3))
    src = str(tmp_path / "src")
    with pytest.raises(transfer.TransferError,
                       match=r"heads/answer/out/kernel has shape \(4, 3\).*expects \(4, 5\)"):
        transfer.apply_config_init_from(_init_config(src, "image,heads/answer"), fresh)
    with pytest.raises(transfer.TransferError, match=r"'audio', which is in neither"):
        transfer.apply_config_init_from(_init_config(src, "image,audio"), fresh)
    nowhere = str(tmp_path / "not_a_checkpoint")
    # checkpoint.CheckpointReadError: a ValueError, as TransferError is, naming the path
    with pytest.raises(ValueError, match=re.escape(nowhere)):
        transfer.apply_config_init_from(_init_config(nowhere), fresh)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(transfer.TransferError, match="Hugging Face folder"):
        transfer.apply_config_init_from(_init_config(str(hf_dir)), fresh)


def test_init_from_a_lora_checkpoint_loads_merged_kernels(tmp_path):
    rng = np.random.default_rng(2)
    fresh = _tiny_tree(rng, classes=5)
    source = _tiny_tree(rng, classes=5)
    a, b = rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
    source["lora"] = {"scale": np.float32(1.5), "fusion": {"proj": {"kernel": {"a": a, "b": b}}}}
    write_checkpoint(tmp_path / "src", source)
    out, report = transfer.load_subtrees(tmp_path / "src", fresh)
    assert report.unexpected == [] and "lora" not in out
    want = source["fusion"]["proj"]["kernel"].astype(np.float64) + 1.5 * (a @ b).astype(np.float64)
    np.testing.assert_allclose(out["fusion"]["proj"]["kernel"], want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def test_layer_decay_scales_follow_the_real_param_paths():
    d = 0.5
    params = _random_like(_model_shapes(), seed=3)
    expected = [  # (path regex, multiplier): ViT depth 2, text depth 1
        (r"^image/(embedding|cls|pos_embedding)(/|$)", d**3),
        (r"^image/encoder/layer_0/", d**2),
        (r"^image/encoder/layer_1/", d),
        (r"^image/(encoder/final_norm|pooler)/", 1.0),
        (r"^text/(token_embedding|position_embedding|segment_embedding|embed_norm)(/|$)", d**2),
        (r"^text/encoder/layer_0/", d),
        (r"^text/pooler/", 1.0),
        (r"^(fusion|heads)/", 1.0),
    ]
    scales = _leaves(optimizers.layer_scales(params, d))
    for path, scale in scales.items():
        hits = [s for pattern, s in expected if re.search(pattern, path)]
        assert len(hits) == 1, (path, hits)  # every real param is covered by the table
        assert scale == hits[0], path
    # Adapters follow their kernel; the LoRA scale is not a weight.
    with_lora = lora.add_adapters(params, {"rank": 2}, rng=0)
    lora_scales = _leaves(optimizers.layer_scales(with_lora, d))
    assert lora_scales["lora/image/encoder/layer_0/attn/query/kernel/a"] == d**2
    assert lora_scales["lora/text/encoder/layer_0/mlp/fc2/kernel/b"] == d
    assert lora_scales["lora/scale"] == 1.0

    grads = _random_like(params, seed=4)
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "decay": "constant",
                                     "layer_decay": d})
    updates = _first_update(optimizers.make_optimizer(cfg, params, total_steps=10), grads, params)
    grads_flat = _leaves(grads)
    assert updates.keys() == grads_flat.keys()
    for path, u in updates.items():
        want = -0.1 * scales[path] * grads_flat[path]
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-8, err_msg=path)

    # AdamW + weight decay + clipping + freeze: the whole update (adaptive step and decay) is
    # scaled; on a part of the tree, to keep the compiles small.
    part = {"image": {k: params["image"][k] for k in ("embedding", "encoder")},
            "heads": params["heads"]}
    part_scales = _leaves(optimizers.layer_scales(part, d))
    part_grads = _random_like(part, seed=5)
    adamw = {"name": "adamw", "lr": 0.1, "decay": "constant", "weight_decay": 0.3,
             "clip_norm": 1.0, "freeze": "layer_1/mlp_norm/"}
    plain = optimizers.make_optimizer(ml_collections.ConfigDict(adamw), part, 10)
    decayed = optimizers.make_optimizer(ml_collections.ConfigDict({**adamw, "layer_decay": d}),
                                   part, 10)
    plain_flat = _first_update(plain, part_grads, part)
    for path, u in _first_update(decayed, part_grads, part).items():
        np.testing.assert_allclose(u, part_scales[path] * plain_flat[path], rtol=1e-5,
                                   atol=1e-8, err_msg=path)
        assert np.any(u != 0) == ("mlp_norm" not in path or "layer_1" not in path), path

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"optimizer\.layer_decay"):
            optimizers.make_optimizer(ml_collections.ConfigDict({**adamw, "layer_decay": bad}),
                                 params, 10)


# ------------------------------------------------------------------------------------------
# LoRA: adapters, effective params, masks


def test_lora_adapters_shapes_math_and_masks():
    params = _random_like(_model_shapes(), seed=5)
    cfg = {"rank": 3, "alpha": 6.0}
    with_lora = lora.add_adapters(params, cfg, rng=jax.random.PRNGKey(0))
    flat = _leaves(params)
    pairs = lora.adapter_pairs(with_lora["lora"])
    wanted = {p for p in flat if re.search(
        r"^(image|text|fusion)/.*(attn/(query|key|value|out)|mlp/fc[12])/kernel$", p)}
    assert set(pairs) == wanted and len(wanted) == 2 * 6 + 1 * 6 + 1 * 10
    assert float(with_lora["lora"]["scale"]) == 2.0
    for path, (a, b) in pairs.items():
        shape = flat[path].shape
        n_in = shape[0] * shape[1] if path.endswith("/out/kernel") else shape[0]
        assert a.shape == (n_in, 3) and b.shape == (3, flat[path].size // n_in), path
        assert np.all(np.asarray(b) == 0) and np.std(np.asarray(a)) > 0
    # b = 0: the adapted model is exactly the base model; no lora subtree: the same object.
    eff = _leaves(lora.effective_params(with_lora))
    assert sorted(eff) == sorted(flat)
    for k, v in eff.items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)
    assert lora.effective_params(params) is params

    # Non-zero adapters: W + (alpha/r)·a@b, acting on the input as the module contracts it.
    rng = np.random.default_rng(6)
    trained = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), with_lora)
    trained["lora"]["scale"] = np.float32(2.0)
    merged = lora.merge(trained)
    assert "lora" not in merged
    for path in ("image/encoder/layer_1/attn/query/kernel",
                 "fusion/encoder/layer_0/attn/out/kernel", "text/encoder/layer_0/mlp/fc1/kernel"):
        w = np.asarray(_leaves(trained)[path], np.float64)
        a, b = (np.asarray(x, np.float64) for x in lora.adapter_pairs(trained["lora"])[path])
        got = np.asarray(_leaves(merged)[path], np.float64)
        np.testing.assert_allclose(got, w + 2.0 * (a @ b).reshape(w.shape), rtol=1e-5, atol=1e-5)
        k = 2 if path.endswith("/out/kernel") else 1  # input axes of the DenseGeneral kernel
        x = rng.normal(size=(5, *w.shape[:k]))
        y = np.tensordot(x, got, axes=k)  # what the module computes with the merged kernel
        x_flat = x.reshape(5, -1)
        lora_y = x_flat @ w.reshape(x_flat.shape[1], -1) + 2.0 * (x_flat @ a) @ b
        np.testing.assert_allclose(y.reshape(5, -1), lora_y, rtol=1e-4, atol=1e-4)

    # The optimizer trains the adapters and lora.train (default: heads) only.
    mask = _leaves(optimizers.trainable_leaves({}, with_lora, cfg))
    assert {p for p, m in mask.items() if m} == (
        {p for p in mask if p.startswith("lora/") and p != "lora/scale"}
        | {p for p in mask if p.startswith("heads/")})
    n_train, n_total = optimizers.trainable_count({}, with_lora, cfg)
    assert n_train == sum(np.size(a) + np.size(b) for a, b in pairs.values()) + sum(
        np.size(v) for k, v in flat.items() if k.startswith("heads/"))
    assert n_total == sum(np.size(v) for v in _leaves(with_lora).values())

    errors = [
        (lambda: lora.add_adapters(params, {"rank": 2, "targets": "nope"}, 0), r"lora\.targets"),
        (lambda: lora.add_adapters(params, {"rank": 2, "targets": "query/bias"}, 0),
         r"query/bias of shape \(2, 4\)"),
        (lambda: lora.add_adapters(params, {"rank": 2, "targets": "("}, 0), r"lora\.targets"),
        (lambda: lora.add_adapters(params, {"rank": -1}, 0), r"lora\.rank"),
        (lambda: lora.add_adapters(with_lora, cfg, 0), r"already"),
        (lambda: optimizers.make_optimizer({"name": "sgd", "lr": 0.1}, params, 10, lora_cfg=cfg),
         r"no 'lora' subtree"),
        (lambda: optimizers.make_optimizer({"name": "sgd", "lr": 0.1}, with_lora, 10,
                                      lora_cfg={**cfg, "train": "^haeds/"}), r"lora\.train"),
    ]
    for fn, match in errors:
        with pytest.raises(ValueError, match=match):
            fn()
    off = lora.add_adapters(params, {"rank": 0}, 0)  # rank 0: off
    assert off.keys() == params.keys() and all(off[k] is params[k] for k in params)


# ------------------------------------------------------------------------------------------
# The trainer: init_from + LoRA + freeze + layer decay, trained, saved, restored, exported


def _trainer_config(src: str) -> ml_collections.ConfigDict:
    config = get_config("tiny")
    with config.unlocked():
        for m in ("image", "text"):
            config.model.encoders[m].update({"width": 16, "depth": 0, "mlp_dim": 32,
                                             "num_heads": 2})
        config.model.fusion.update({"width": 16, "depth": 1, "num_heads": 2})
        config.total_steps = 3
        config.optimizer.update({"warmup_steps": 0, "lr": 1e-2, "weight_decay": 0.1,
                                 "layer_decay": 0.5,
                                 # LoRA would train this adapter matrix; freeze wins.
                                 "freeze": "mlp/fc2/kernel/a$"})
        config.init_from = src
        config.lora = {"rank": 2, "alpha": 4.0, "train": "^heads/|^fusion/encoder/final_norm/"}
    return config


@pytest.mark.slow
def test_trainer_init_from_lora_freeze_train_restore_and_export(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src, workdir = tmp_path / "src", tmp_path / "run"
    config = _trainer_config(str(src))
    workdir.mkdir()
    run = trainer.setup(config, workdir)  # fills vocab/classes from the data
    sample = synthetic_batch(config, 2)  # the data's shapes
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(
        lambda: run.model.init({"params": key, "dropout": key}, sample, train=False))["params"]
    source = _leaves(_random_like(shapes, seed=7))
    del source["fusion/encoder/final_norm/scale"]  # missing: keeps its fresh init (ones)
    source["fusion/extra/kernel"] = np.ones((2, 2), np.float32)  # unexpected: ignored
    write_checkpoint(src, traverse_util.unflatten_dict(source, sep="/"))

    state, tx = loop.initial_state(run)
    assert "lora" not in state.params  # the adapters are a field of their own
    base = _leaves(state.params)
    for path, value in base.items():
        if path.startswith("heads/"):  # not loaded by default: the fresh (zero) classifier
            assert not np.any(np.asarray(value)), path
        elif path == "fusion/encoder/final_norm/scale":
            np.testing.assert_array_equal(value, np.ones_like(value))
        else:
            np.testing.assert_array_equal(value, source[path], err_msg=path)
    assert "1 missing (kept fresh): fusion/encoder/final_norm/scale" in caplog.text
    assert "1 unexpected (ignored): fusion/extra/kernel" in caplog.text
    # Adapters on the fusion layer's 4+4 attention and 2 MLP kernels, b = 0: output unchanged.
    pairs = lora.adapter_pairs(state.adapters)
    assert len(pairs) == 10 and all(p.startswith("fusion/encoder/layer_0/") for p in pairs)
    n_adapters = sum(np.size(a) + np.size(b) for a, b in pairs.values())
    n_frozen_a = np.size(pairs["fusion/encoder/layer_0/mlp/fc2/kernel"][0])
    n_train = n_adapters - n_frozen_a + sum(
        np.size(v) for k, v in base.items()
        if k.startswith(("heads/", "fusion/encoder/final_norm/")))
    n_total = sum(np.size(v) for v in _leaves(state.trainable()).values())
    assert f"trainable parameters: {n_train:,} of {n_total:,}" in caplog.text

    model, tasks = run.model, run.tasks
    step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, tasks=tasks,
                                     weights=run.weights))
    trained = state
    for i in range(3):
        trained, metrics = step(trained, synthetic_batch(config, 8, seed=10 + i))
    assert np.isfinite(float(metrics["loss"]))
    before, after = _leaves(state.trainable()), _leaves(trained.trainable())
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    frozen_a = "lora/fusion/encoder/layer_0/mlp/fc2/kernel/a"  # a random matrix: weight decay
    should_move = {p for p in before if p.startswith(("heads/", "lora/", "fusion/encoder/final_"))
                   and p not in ("lora/scale", frozen_a)}  # would move it if it were trained
    assert moved == should_move  # frozen (weight decay on): bit-identical; trainable: moved
    for path in (p for p in before if p not in moved):
        assert np.asarray(before[path]).tobytes() == np.asarray(after[path]).tobytes(), path

    # Save as the trainer does; restore into a fresh state's structure (what a resume does).
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt = Checkpointer(workdir, best_metric=None, asynchronous=False)
    ckpt.save(3, trained, {"next_index": 3})
    ckpt.close()
    ckpt = Checkpointer(workdir, best_metric=None)
    restored_step, restored, _ = ckpt.restore_latest(run.par.checkpoint_target(state))
    ckpt.close()
    assert restored_step == 3
    for (path, a), b in zip(_leaves(trained).items(), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=path)

    # Export: merged plain params give the LoRA model's outputs.
    merged = lora.merged_params_from_workdir(workdir)
    assert "lora" not in merged and sorted(_leaves(merged)) == sorted(base)
    batch = synthetic_batch(config, 8, seed=20)

    @jax.jit
    def outputs(plain, with_lora):
        run = lambda p: step_lib.forward(p, state.model_state, batch, None, model=model,
                                         train=False)[0]
        return run(plain), run(with_lora)

    # The merged kernels differ from the base ones (b moved), so equal outputs also show that
    # forward applies the adapters.
    plain_out, lora_out = outputs(merged, trained.trainable())
    for a, b in zip(jax.tree.leaves(plain_out), jax.tree.leaves(lora_out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    kernel = "fusion/encoder/layer_0/mlp/fc1/kernel"
    assert np.max(np.abs(_leaves(merged)[kernel] - after[kernel])) > 1e-4
