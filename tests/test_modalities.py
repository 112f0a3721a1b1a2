"""Fusion over N modalities, attention bottlenecks, absent modalities and modality dropout.

Each test changes one modality's input (or a learned stand-in) and checks exactly which outputs
move: what a fusion may read is a dependence property, so it is tested as one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import fusion as fusion_lib
from mmjax.models import losses
from mmjax.models.multimodal import MultimodalModel, build_model

B = 6
KINDS_N = ("concat", "cross_attention", "late", "bottleneck")


def _cfg(kind: str, **extra) -> dict:
    return {
        "encoders": {
            "image": {"kind": "vit", "variant": "mu/8", "width": 32, "depth": 1, "num_heads": 2,
                      "mlp_dim": 64, "pool": "gap"},
            "text": {"kind": "text", "variant": "mu", "width": 32, "depth": 1, "num_heads": 2,
                     "mlp_dim": 64, "vocab_size": 60, "max_len": 8},
            "audio": {"kind": "ast", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                      "patch_size": 4, "frequency_stride": 4, "time_stride": 4},
        },
        "fusion": {"kind": kind, "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64},
        "heads": {"answer": {"kind": "classification", "num_classes": 5}},
        **extra,
    }


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((B, 8), np.int32)
    mask[:, 6:] = 0
    return {
        "image": rng.normal(size=(B, 16, 16, 3)).astype(np.float32),
        "text": {"ids": rng.integers(5, 60, (B, 8)).astype(np.int32), "mask": mask},
        "audio": rng.normal(size=(B, 12, 8)).astype(np.float32),
    }


def _random_params(model: MultimodalModel, batch: dict, seed: int = 0) -> dict:
    """Initialised params with every leaf redrawn (zero-initialised heads would hide
    dependence)."""
    params = model.init(jax.random.PRNGKey(seed), batch)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves,
                                                                          strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _logits(model: MultimodalModel, params: dict, batch: dict) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, batch)["answer"]["logits"])


def _changed(batch: dict, modality: str, seed: int) -> dict:
    other = _batch(seed)
    return {**batch, modality: other[modality]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS_N)
def test_every_fusion_kind_reads_all_three_modalities(kind):
    model = build_model(_cfg(kind))
    batch = _batch(0)
    params = _random_params(model, batch)
    base = _logits(model, params, batch)
    assert np.all(np.isfinite(base))
    for m in ("image", "text", "audio"):
        moved = np.abs(_logits(model, params, _changed(batch, m, 1)) - base).max()
        assert moved > 1e-3, f"{kind}: the output does not depend on {m}"


def test_co_attention_takes_two_modalities():
    model = build_model(_cfg("co_attention"))
    with pytest.raises(ValueError, match="co_attention fuses exactly two"):
        model.init(jax.random.PRNGKey(0), _batch(0))


@pytest.mark.slow  # over 10 s: eager initialisation of two fused models
def test_bottleneck_exchanges_only_through_its_tokens():
    """One layer: a modality's stream has seen only the initial bottleneck tokens, so it cannot
    depend on another modality; two layers: it does (through the averaged tokens)."""
    batch = _batch(0)

    def image_stream(depth: int, b: dict) -> np.ndarray:
        cfg = _cfg("bottleneck")
        cfg["encoders"].pop("audio")
        cfg["fusion"]["depth"] = depth
        model = build_model(cfg)
        params = _random_params(model, batch)
        towers = model.apply({"params": params}, b, method=MultimodalModel.encode)
        fused = model.apply({"params": params}, towers, method=lambda mdl, t: mdl.fuser(t))
        return np.asarray(fused["tokens"][:, : 1 + 4])  # [image CLS, 4 image patches]

    other_text = _changed(batch, "text", 5)
    assert np.abs(image_stream(1, batch) - image_stream(1, other_text)).max() < 1e-6
    assert np.abs(image_stream(2, batch) - image_stream(2, other_text)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", (*KINDS_N, "co_attention"))
def test_absent_modality_is_replaced_by_its_learned_token(kind):
    cfg = _cfg(kind)
    if kind == "co_attention":
        cfg["encoders"].pop("audio")
    model = build_model(cfg)
    batch = _batch(0)
    params = _random_params(model, batch)
    present = np.ones(B, bool)
    present[:3] = False  # examples 0-2 have no image
    with_absent = {**batch, "present": {"image": present}}
    base = _logits(model, params, with_absent)
    moved = np.abs(_logits(model, params, {**_changed(batch, "image", 1),
                                           "present": {"image": present}}) - base)
    assert moved[:3].max() < 1e-5, "an absent image's placeholder reached the output"
    assert moved[3:].max() > 1e-3
    # The stand-in is learned: changing it moves exactly the examples without an image.
    key = "image_absent_pooled" if kind == "late" else "image_absent"
    fusion = dict(params["fusion"])
    # (a random change: adding a constant to every entry would vanish in the LayerNorms)
    fusion[key] = fusion[key] + jax.random.normal(jax.random.PRNGKey(9), fusion[key].shape)
    moved = np.abs(_logits(model, {**params, "fusion": fusion}, with_absent) - base)
    assert moved[:3].max() > 1e-3
    assert moved[3:].max() < 1e-6
    # All present equals no "present" key at all.
    all_present = {**batch, "present": {"image": np.ones(B, bool)}}
    np.testing.assert_allclose(_logits(model, params, all_present),
                               _logits(model, params, batch), rtol=1e-5, atol=1e-5)


def test_modality_dropout_rate_and_never_all():
    p, n = 0.4, 4096
    model = build_model(_cfg("concat", modality_dropout=p))
    rng = np.random.default_rng(3)
    batch = {
        "image": np.zeros((n, 1)), "text": np.zeros((n, 1)), "audio": np.zeros((n, 1)),
        "present": {"audio": rng.uniform(size=n) < 0.5},  # half the examples have no audio
    }
    kept = model.apply({}, batch, train=True, rngs={"dropout": jax.random.PRNGKey(7)},
                       method=MultimodalModel.presence)
    keep = np.stack([np.asarray(kept[m]) for m in ("image", "text", "audio")], 1)
    assert keep.any(axis=1).all(), "an example lost all its modalities"
    assert not keep[~batch["present"]["audio"], 2].any(), "dropout brought back absent audio"
    # With audio: a modality survives unless dropped (p), except that when all three are
    # dropped (p^3) one of them, uniformly chosen, comes back: P(kept) = 1 - p + p^3 / 3.
    full = batch["present"]["audio"]
    expected3 = 1 - p + p**3 / 3
    np.testing.assert_allclose(keep[full].mean(axis=0), expected3, atol=0.03)
    # Without audio: two modalities, P(kept) = 1 - p + p^2 / 2.
    np.testing.assert_allclose(keep[~full, :2].mean(axis=0), 1 - p + p**2 / 2, atol=0.03)
    # Evaluation keeps what the batch says.
    kept = model.apply({}, batch, train=False, method=MultimodalModel.presence)
    assert kept["image"] is None and np.array_equal(kept["audio"], batch["present"]["audio"])


@pytest.mark.slow
def test_modality_dropout_trains_on_a_subset():
    """A train step with modality dropout sees examples whose image is replaced: the loss
    differs from the same step without dropout, and the image stand-in gets a gradient."""
    model = build_model(_cfg("cross_attention", modality_dropout=0.5))
    batch = _batch(0)
    params = _random_params(model, batch)

    def loss(prm, rng):
        out = model.apply({"params": prm}, batch, train=True, rngs={"dropout": rng})
        return jnp.mean(out["answer"]["logits"] ** 2)

    grads = jax.grad(loss)(params, jax.random.PRNGKey(0))
    assert float(jnp.abs(grads["fusion"]["image_absent"]).max()) > 0
    no_drop = build_model(_cfg("cross_attention"))
    g0 = jax.grad(lambda prm: jnp.mean(no_drop.apply({"params": prm}, batch, train=True)[
        "answer"]["logits"] ** 2))(params)
    assert float(jnp.abs(g0["fusion"]["image_absent"]).max()) == 0


@pytest.mark.parametrize("bad, match", [
    ({"modality_dropout": 1.0}, r"model\.modality_dropout"),
    ({"modality_dropout": -0.1}, r"model\.modality_dropout"),
    ({"modality_dropout": 0.2, "fusion": {"kind": "none"}}, "needs a fusion"),
])
def test_modality_dropout_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg("concat", **bad))


def test_present_naming_an_unknown_modality_is_an_error():
    model = build_model(_cfg("concat"))
    batch = _batch(0)
    variables = model.init(jax.random.PRNGKey(0), batch)
    with pytest.raises(ValueError, match=r"'video'"):
        model.apply(variables, {**batch, "present": {"video": np.ones(B, bool)}})


def test_contrastive_loss_between_audio_and_text():
    """A CLAP-style head: the infonce loss reads the pair its config names; checked against the
    symmetric cross-entropy written out in numpy."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 8))
    t = rng.normal(size=(5, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    scale = 3.0
    outputs = {"audio_embeds": a, "text_embeds": t, "logit_scale": np.log(scale)}
    value, _ = losses.get_loss("infonce")(outputs, {}, {"modalities": ("audio", "text")})
    logits = scale * a @ t.T

    def xent(z):
        z = z - z.max(axis=1, keepdims=True)
        return -(np.diag(z) - np.log(np.exp(z).sum(axis=1))).mean()

    np.testing.assert_allclose(float(value), 0.5 * (xent(logits) + xent(logits.T)), rtol=1e-5)
    with pytest.raises(KeyError):
        losses.get_loss("infonce")(outputs, {}, {})  # the default pair needs image_embeds


def test_fill_absent_masks_all_but_the_first_position():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 2)), jnp.float32)
    token = jnp.asarray([5.0, -5.0])
    present = jnp.asarray([True, False, True])
    y, mask = fusion_lib.fill_absent(x, None, present, token)
    np.testing.assert_array_equal(np.asarray(y[1]), np.tile([5.0, -5.0], (4, 1)))
    np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(x[0]))
    np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
