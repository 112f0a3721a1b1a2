"""``model.scan_layers``: the scanned encoder computes what the unrolled one does.

The scanned layout stacks every layer's params on a leading axis (``encoder/layers/...``), so the
checks are: the same outputs and gradients as the unrolled model given the same (converted)
params, the same optimizer update (weight decay must not reach stacked biases, layer-wise decay
must scale each layer's slice; ``freeze`` and LoRA may name unrolled layers), checkpoints that
load across layouts. Float32 on the CPU, fresh random inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.io.checkpoint import write_checkpoint
from mmjax.models import scan as scan_lib
from mmjax.models.multimodal import build_model
from mmjax.models.paths import path_str
from mmjax.optim import lora, optimizers
from mmjax.trainer import transfer

MODEL = {
    "encoders": {
        "image": {"kind": "vit", "variant": "mu/4", "width": 16, "depth": 3, "num_heads": 2,
                  "mlp_dim": 24, "class_token": True, "pool": "cls", "embed_norm": True},
        "text": {"kind": "text", "vocab_size": 23, "width": 16, "depth": 2, "num_heads": 4,
                 "mlp_dim": 32, "max_len": 7, "causal": True, "pre_norm": True, "pool": "last"},
    },
    "fusion": {"kind": "cross_attention", "width": 16, "depth": 2, "num_heads": 2},
    "heads": {"answer": {"kind": "classification", "num_classes": 5},
              "clip": {"kind": "contrastive", "embed_dim": 8}},
    "dtype": "float32",
}


def _model(scan: bool, **extra):
    return build_model({**MODEL, "scan_layers": scan, **extra})


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 8, size=4)
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
    return {"image": rng.standard_normal((4, 12, 12, 3)).astype(np.float32),
            "text": {"ids": rng.integers(1, 23, (4, 7)).astype(np.int32) * mask, "mask": mask}}


def _leaves(tree) -> dict:
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@functools.cache
def _shapes(scan: bool) -> dict:
    return jax.eval_shape(lambda: _model(scan).init(jax.random.key(0), _batch(0)))["params"]


def _random_params(seed: int) -> dict:
    """Unrolled params filled at random (std 0.3, so every layer changes its input)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                        _shapes(False))


def test_layouts_convert_both_ways():
    unrolled = _random_params(1)
    scanned = scan_lib.match_layers(unrolled, _shapes(True))
    assert jax.tree.structure(scanned) == jax.tree.structure(_shapes(True))
    for name, want in (("image", 3), ("text", 2), ("fusion", 2)):
        stacked = scanned[name]["encoder"][scan_lib.SCANNED]
        assert {x.shape[0] for x in jax.tree.leaves(stacked)} == {want}
        assert not any(k.startswith("layer_") for k in scanned[name]["encoder"])
    np.testing.assert_array_equal(
        scanned["image"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"][2],
        unrolled["image"]["encoder"]["layer_2"]["mlp"]["fc1"]["kernel"])
    back = scan_lib.match_layers(scanned, _shapes(False))
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)
    jax.tree.map(np.testing.assert_array_equal, scan_lib.unstack_all(scanned), unrolled)
    # A tree in the target's layout already passes through untouched.
    same = scan_lib.match_layers(unrolled, _shapes(False))
    assert jax.tree.structure(same) == jax.tree.structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, same, unrolled)


def _outputs_and_grads(model, params, batch, weights_seed: int):
    """The model's outputs, the gradient of a fixed random functional of all of them, and the
    program mmjax hands to XLA (StableHLO text, for loop checks)."""
    def objective(p):
        outs = model.apply({"params": p}, batch)
        rng = np.random.default_rng(weights_seed)
        total = sum(jnp.vdot(o, rng.standard_normal(o.shape).astype(np.float32))
                    for o in jax.tree.leaves(outs))
        return total, outs

    lowered = jax.jit(jax.value_and_grad(objective, has_aux=True)).lower(params)
    (_, outs), grads = lowered.compile()(params)
    return jax.device_get(outs), jax.device_get(grads), lowered.as_text()


@functools.cache
def _unrolled_reference() -> tuple:
    return _outputs_and_grads(_model(False), _random_params(2), _batch(3), 4)


@pytest.mark.slow
@pytest.mark.parametrize(("unroll", "remat"), [(1, None), (0, "nothing_saveable"), (2, None)])
def test_scanned_model_matches_unrolled_outputs_and_grads(unroll, remat):
    """ViT, causal text and cross-attention fusion, scanned: one layer per loop iteration, all
    layers in one (``scan_unroll=0``, the default: no loop; under remat here) and two per
    iteration (depth 3: a remainder). The co-attention test below runs the loop under remat."""
    scanned = scan_lib.match_layers(_random_params(2), _shapes(True))
    outs_ref, g_ref, _ = _unrolled_reference()
    outs, g, program = _outputs_and_grads(_model(True, scan_unroll=unroll, remat=remat),
                                          scanned, _batch(3), 4)
    # A forward and a backward loop per stack that the unroll leaves more than one step: the
    # three stacks (depths 3, 2, 2) at unroll=1, none at 0, the depth-3 stack alone at 2.
    assert program.count("stablehlo.while") == {1: 6, 0: 0, 2: 2}[unroll]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 outs, outs_ref)
    assert np.abs(g["image"]["encoder"]["layers"]["attn"]["query"]["kernel"][0]).max() > 0
    got = _leaves(g)
    for name, want in _leaves(scan_lib.match_layers(g_ref, _shapes(True))).items():
        np.testing.assert_allclose(got[name], want, rtol=2e-4, atol=2e-5, err_msg=name)


CO_FUSION = {"kind": "co_attention", "width": 16, "depth": 3, "num_heads": 2}


@pytest.mark.slow
def test_scanned_co_attention_matches_unrolled():
    """The co-attention fusion scans its layer pairs: co_layers/<stream>/... with depth 3, as a
    loop (scan_unroll=1) under remat."""
    unrolled_model = _model(False, fusion=CO_FUSION)
    scanned_model = _model(True, fusion=CO_FUSION, remat="nothing_saveable", scan_unroll=1)
    init = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), _batch(0)))["params"]
    target = init(scanned_model)
    assert set(target["fusion"]["co_layers"]) == {"image", "text"}
    rng = np.random.default_rng(12)
    unrolled = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                            init(unrolled_model))
    assert "image_layer_2" in unrolled["fusion"] and "text_layer_0" in unrolled["fusion"]
    scanned = scan_lib.match_layers(unrolled, target)
    assert jax.tree.structure(scanned) == jax.tree.structure(target)
    np.testing.assert_array_equal(scanned["fusion"]["co_layers"]["text"]["mlp"]["fc2"]["kernel"][1],
                                  unrolled["fusion"]["text_layer_1"]["mlp"]["fc2"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, scan_lib.unstack_all(scanned), unrolled)
    outs_ref, g_ref, _ = _outputs_and_grads(unrolled_model, unrolled, _batch(13), 14)
    outs, g, _ = _outputs_and_grads(scanned_model, scanned, _batch(13), 14)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 outs, outs_ref)
    got = _leaves(g)
    for name, want in _leaves(scan_lib.match_layers(g_ref, target)).items():
        np.testing.assert_allclose(got[name], want, rtol=2e-4, atol=2e-5, err_msg=name)
    mask = _leaves(optimizers.decay_mask(scanned))
    assert mask["fusion/co_layers/image/mlp/fc1/kernel"]
    assert not mask["fusion/co_layers/image/mlp/fc1/bias"]


@pytest.mark.slow
def test_scanned_dropout_follows_its_key():
    """Train mode inside the scan: dropout is on, reproducible per key, different across keys."""
    params = scan_lib.match_layers(_random_params(5), _shapes(True))
    model = _model(True, dropout=0.3)
    fn = jax.jit(lambda k: [model.apply({"params": params}, _batch(6), train=t,
                                        rngs={"dropout": k})["answer"]["logits"] for t in (1, 0)])
    (a, evaluated), (b, _), (a2, _) = (fn(jax.random.key(k)) for k in (0, 1, 0))
    assert np.isfinite(a).all() and not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, evaluated)


@pytest.mark.slow
def test_scanned_optimizer_update_matches_unrolled():
    """Weight decay skips stacked biases/norms; layer decay scales each stacked slice."""
    cfg = {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "decay": "constant",
           "weight_decay": 0.3, "clip_norm": 0.5, "layer_decay": 0.6}
    unrolled = _random_params(7)
    grads = _random_params(8)
    scanned = scan_lib.match_layers(unrolled, _shapes(True))
    g_scanned = scan_lib.match_layers(grads, _shapes(True))

    mask = _leaves(optimizers.decay_mask(scanned))
    assert mask["image/encoder/layers/mlp/fc1/kernel"]
    assert not mask["image/encoder/layers/mlp/fc1/bias"]
    assert not mask["text/encoder/layers/attn_norm/scale"]
    scales = _leaves(optimizers.layer_scales(scanned, 0.6))
    np.testing.assert_allclose(scales["image/encoder/layers/attn/query/bias"].ravel(),
                               0.6 ** np.array([3, 2, 1]))

    _assert_same_updates(cfg, unrolled, grads, scanned, g_scanned)


def _updates(cfg: dict, params, grads, lora_cfg=None):
    """The optimizer's first two updates (the second from the state the first left)."""
    tx = optimizers.make_optimizer(cfg, params, total_steps=10, lora_cfg=lora_cfg)

    def two(g, p):
        u1, state = tx.update(g, tx.init(p), p)
        p = jax.tree.map(jnp.add, p, u1)
        u2, _ = tx.update(jax.tree.map(lambda x: -0.5 * x, g), state, p)
        return u1, u2

    return jax.device_get(jax.jit(two)(grads, params))


def _assert_same_updates(cfg, unrolled, grads, scanned, g_scanned, lora_cfg=None):
    """The scanned model's updates are the unrolled model's, stacked; returns them."""
    got = _updates(cfg, scanned, g_scanned, lora_cfg)
    ref = _updates(cfg, unrolled, grads, lora_cfg)
    for u_ref, u in zip(ref, got, strict=True):
        want, have = _leaves(scan_lib.match_layers(u_ref, scanned)), _leaves(u)
        assert want.keys() == have.keys()
        for name in want:
            np.testing.assert_allclose(have[name], want[name], rtol=1e-5, atol=1e-7,
                                       err_msg=name)
    return got


def test_checkpoints_load_across_layouts(tmp_path):
    unrolled = _random_params(9)
    write_checkpoint(tmp_path / "unrolled", unrolled)
    fresh_scanned = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _shapes(True))
    loaded, report = transfer.load_subtrees(tmp_path / "unrolled", fresh_scanned, "image,text")
    assert not report.missing and not report.unexpected
    want = scan_lib.match_layers(unrolled, _shapes(True))
    for part in ("image", "text"):
        jax.tree.map(np.testing.assert_array_equal, loaded[part], want[part])
    assert not np.any(jax.tree.leaves(loaded["fusion"])[0])  # not listed: stays fresh

    write_checkpoint(tmp_path / "scanned", want)
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _shapes(False))
    back, report = transfer.load_subtrees(tmp_path / "scanned", fresh, "")
    assert not report.missing and not report.unexpected
    for part in ("image", "text", "fusion"):
        jax.tree.map(np.testing.assert_array_equal, back[part], unrolled[part])


def test_resuming_under_the_other_layout_names_the_cause_and_keeps_the_checkpoint(tmp_path):
    """A run's own checkpoint is not converted on resume (init_from is how to switch layouts);
    the error says so, and the checkpoint still restores with the layout it was written with."""
    from mmjax.io.checkpoint import Checkpointer, CheckpointError

    unrolled = {"params": jax.tree.map(jnp.asarray, _random_params(11))}
    ckpt = Checkpointer(tmp_path, best_metric=None, asynchronous=False)
    ckpt.save(3, unrolled, {})
    scanned_target = {"params": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _shapes(True))}
    with pytest.raises(CheckpointError, match=r"scan_layers.*config.init_from.*left as it is"):
        ckpt.restore_latest(scanned_target)
    step, state, _ = ckpt.restore_latest(unrolled)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, unrolled)
    ckpt.close()


def test_depth_zero_scans_nothing():
    """depth 0 scanned has no layer params at all (as unrolled): no zero-size stacked arrays,
    which Orbax refuses to save."""
    towers = MODEL["encoders"]
    zero = {**MODEL, "encoders": {**towers, "image": {**towers["image"], "depth": 0}},
            "fusion": {**CO_FUSION, "depth": 0}}
    for scan in (False, True):
        shapes = jax.eval_shape(lambda s=scan: build_model({**zero, "scan_layers": s}).init(
            jax.random.key(0), _batch(0)))["params"]
        assert "layers" not in shapes["image"]["encoder"] and "layer_0" not in shapes["image"][
            "encoder"]
        assert not any("layer" in k for k in shapes["fusion"])
        assert all(x.size for x in jax.tree.leaves(shapes))


OPT = {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "decay": "constant",
       "weight_decay": 0.3, "clip_norm": 0.5, "layer_decay": 0.7}


@pytest.mark.slow
def test_freezing_some_layers_of_a_scanned_model_matches_unrolled():
    """``freeze`` names unrolled layers; in a scanned model it freezes those slices of the stacked
    leaves: exactly zero updates there, and the other layers' updates (clipped by a global norm
    that must not count the frozen layers) equal the unrolled model's."""
    cfg = {**OPT, "freeze": r"image/encoder/layer_[02]/|text/encoder/layer_1/mlp|^fusion/"}
    unrolled, grads = _random_params(14), _random_params(15)
    scanned = scan_lib.match_layers(unrolled, _shapes(True))
    g_scanned = scan_lib.match_layers(grads, _shapes(True))
    mask = _leaves(optimizers.trainable_mask(scanned, cfg["freeze"]))
    np.testing.assert_array_equal(mask["image/encoder/layers/mlp/fc1/kernel"], [0, 1, 0])
    np.testing.assert_array_equal(mask["text/encoder/layers/mlp/fc2/bias"], [1, 0])
    assert mask["text/encoder/layers/attn/query/kernel"].item() is True
    assert mask["fusion/encoder/layers/attn/out/kernel"].item() is False
    assert optimizers.trainable_count(cfg, scanned) == optimizers.trainable_count(cfg, unrolled)

    u1, u2 = _assert_same_updates(cfg, unrolled, grads, scanned, g_scanned)
    for u in (u1, u2):
        fc1 = u["image"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
        assert not fc1[0].any() and not fc1[2].any() and np.abs(fc1[1]).min() > 0
        assert not u["text"]["encoder"]["layers"]["mlp"]["fc2"]["bias"][1].any()


def _lora_pair(targets: str | None = None):
    """Unrolled params with LoRA adapters (random b, so every adapter changes its kernel), and
    the same values in the scanned layout."""
    cfg = {"rank": 2, "alpha": 3.0, **({"targets": targets} if targets else {})}
    unrolled = lora.add_adapters(_random_params(16), cfg, 0)
    rng = np.random.default_rng(17)
    unrolled = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        if path_str(p).endswith("/b") else x, unrolled)
    target = lora.add_adapters(scan_lib.match_layers(_random_params(16), _shapes(True)), cfg, 1)
    return cfg, unrolled, scan_lib.match_layers(unrolled, target)


@pytest.mark.slow
def test_lora_adapts_stacked_kernels_as_the_unrolled_layers():
    cfg, unrolled, scanned = _lora_pair()
    a = scanned["lora"]["image"]["encoder"]["layers"]["attn"]["out"]["kernel"]["a"]
    assert a.shape == (3, 16, 2)  # [depth, heads * head_dim, rank]
    # one pair per stacked kernel: q, k, v, out, fc1, fc2 per tower, + cross_attn in the fusion
    assert len(lora.adapter_pairs(scanned["lora"])) == 6 + 6 + 10
    want = scan_lib.match_layers(lora.effective_params(unrolled), _shapes(True))
    got = lora.effective_params(scanned)
    assert not np.allclose(got["text"]["encoder"]["layers"]["mlp"]["fc2"]["kernel"],
                           scanned["text"]["encoder"]["layers"]["mlp"]["fc2"]["kernel"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), got, want)
    merged = scan_lib.match_layers(lora.merge(unrolled), _shapes(True))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                 lora.merge(scanned), merged)

    # The optimizer trains the stacked adapters (each layer's slice with its layer-decay scale)
    # and the heads, as it does unrolled.
    g_unrolled = jax.tree.map(lambda x: np.random.default_rng(x.size).standard_normal(x.shape)
                              .astype(np.float32), unrolled)
    g_scanned = scan_lib.match_layers(g_unrolled, scanned)
    u1, _ = _assert_same_updates(OPT, unrolled, g_unrolled, scanned, g_scanned, cfg)
    assert not np.any(u1["image"]["encoder"]["layers"]["attn"]["out"]["kernel"])
    assert np.abs(u1["lora"]["image"]["encoder"]["layers"]["attn"]["out"]["kernel"]["a"]).min() > 0


def test_lora_targets_name_unrolled_layers_and_must_cover_a_stacked_kernel():
    _, _, scanned = _lora_pair(targets=r"encoder/layer_\d+/mlp/fc1/kernel$")
    assert sorted(lora.adapter_pairs(scanned["lora"])) == [
        f"{t}/encoder/layers/mlp/fc1/kernel" for t in ("fusion", "image", "text")]
    plain = scan_lib.match_layers(_random_params(18), _shapes(True))
    with pytest.raises(ValueError, match=r"matches layers \[0, 1\] of 3 of image/encoder/layers/"
                                         r"attn/query/kernel.*all of them or none"):
        lora.add_adapters(plain, {"rank": 2,
                                  "targets": r"image/encoder/layer_[01]/attn/query/kernel"}, 0)


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_bad_scan_unroll_is_named(bad):
    with pytest.raises(ValueError, match=r"model.scan_unroll="):
        _model(True, scan_unroll=bad)
