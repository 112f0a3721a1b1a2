"""mmjax.explain on tiny random models: the explain attention path against the fused one and
transformers' attention probabilities, integrated gradients against Captum and completeness,
Chefer relevance against a PyTorch transcription of the authors' rules, occlusion and modality
contributions against direct forward passes, layer-view statistics against scipy/sklearn."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import captum.attr
import scipy.stats
import torch
import transformers

from mmjax import hf
from mmjax.interpret import capture, contributions, gradients, layout, methods, relevance, views
from mmjax.models import encoders, layers
from mmjax.models.multimodal import build_model

IG_TOL = 1e-4


def _jit(fn, *static, **options):
    """``fn(*static, ..., **options)`` jitted over the remaining arguments (tests run compiled)."""
    return jax.jit(lambda *a: fn(*static, *a, **options))


@functools.cache
def _model(kind: str, text_depth: int = 1, image_depth: int = 1):
    """(model, variables, batch) of a tiny image+text model fused by ``kind`` (built once per
    kind; tests must not modify what it returns)."""
    cfg = {
        "encoders": {
            "image": {"kind": "vit", "variant": "mu/8", "width": 16, "depth": image_depth,
                      "num_heads": 2, "mlp_dim": 32, "pos_embedding_std": 1.0},
            "text": {"kind": "text", "variant": "mu", "width": 16, "depth": text_depth,
                     "num_heads": 2, "mlp_dim": 32, "vocab_size": 30, "max_len": 8},
        },
        "fusion": {"kind": kind, "width": 16, "depth": 2, "num_heads": 2},
        "heads": {"answer": {"kind": "classification", "num_classes": 5}},
    }
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 30, (3, 8)).astype(np.int32)
    mask = np.ones((3, 8), np.int32)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    batch = {"image": rng.normal(size=(3, 16, 24, 3)).astype(np.float32),
             "text": {"ids": ids, "mask": mask}}
    variables = model.init(jax.random.PRNGKey(1), batch)
    # A classifier initialised at zero answers uniformly: give it random weights.
    out = variables["params"]["heads"]["answer"]["out"]
    out["kernel"] = jax.random.normal(jax.random.PRNGKey(2), out["kernel"].shape)
    return model, variables, batch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cross_attention", "concat", "co_attention", "late"])
def test_explain_path_matches_normal_path(kind: str) -> None:
    model, variables, batch = _model(kind)
    normal = jax.jit(model.apply)(variables, batch)["answer"]["logits"]
    em, ev = capture.explained_model(model, variables)
    explained = jax.jit(em.apply)(ev, batch)["answer"]["logits"]
    assert jax.tree.structure(ev["params"]) == jax.tree.structure(variables["params"])
    np.testing.assert_allclose(explained, normal, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # over 10 s: compiles the scanned, rematerialised model
def test_scanned_fused_model_is_explained_on_the_xla_path() -> None:
    """A model trained with scanned layers, remat and cuDNN attention (which has no weights to
    show, and no CPU kernel) is explained unrolled, on the XLA path."""
    model, variables, batch = _model("cross_attention")
    scanned = model.clone(opts=dataclasses.replace(
        model.opts, scan_layers=True, attn_implementation="cudnn", remat="nothing_saveable"))
    from mmjax.models import scan
    shapes = jax.eval_shape(model.clone(opts=dataclasses.replace(
        model.opts, scan_layers=True)).init, jax.random.PRNGKey(0), batch)["params"]
    sv = {"params": scan.match_layers(variables["params"], shapes)}
    em, ev = capture.explained_model(scanned, sv)
    np.testing.assert_allclose(jax.jit(em.apply)(ev, batch)["answer"]["logits"],
                               jax.jit(model.apply)(variables, batch)["answer"]["logits"],
                               atol=1e-5)
    _, state = jax.jit(lambda v, b: em.apply(v, b, mutable=["intermediates"]))(ev, batch)
    assert "fusion/encoder/layer_1/cross_attn" in capture.paths(state["intermediates"],
                                                                "attention")


def _bert(tmp_path) -> tuple:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2,
                                  num_attention_heads=3, intermediate_size=40,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"  # attention probabilities as outputs
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path / "bert")
    model, variables = hf.load(tmp_path / "bert")
    model = model.clone(text={**model.text, "opts": layers.Options(explain=True)})
    rng = np.random.default_rng(3)
    ids = rng.integers(4, 61, (2, 9)).astype(np.int64)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    return ref, model, variables, ids, mask


@pytest.mark.slow
def test_attention_weights_match_transformers(tmp_path) -> None:
    ref, model, variables, ids, mask = _bert(tmp_path)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   output_attentions=True).attentions
    _, state = model.apply(variables, ids, mask, mutable=["intermediates"])
    got = capture.paths(state["intermediates"], "attention")
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"text/encoder/layer_{i}/attn"], w.numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", gradients.RULES)
def test_integrated_gradients_bert_embeddings_match_captum(tmp_path, rule: str) -> None:
    ref, model, variables, ids, mask = _bert(tmp_path)
    tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
    emb = ref.embeddings.word_embeddings(tids).detach()
    ig = captum.attr.IntegratedGradients(
        lambda e, m: ref(inputs_embeds=e, attention_mask=m).pooler_output[:, 1])
    want = ig.attribute(emb, baselines=torch.zeros_like(emb), additional_forward_args=(tmask,),
                        n_steps=24, method=rule).detach().numpy()

    _, zero = model.apply(variables, ids, mask, mutable=["perturbations"])
    e = jnp.asarray(emb.numpy())

    def f(z):
        p = capture.with_perturbation(zero["perturbations"], "text/token_embeddings", z - e)
        return model.apply({**variables, "perturbations": p}, ids, mask)["pooler_output"][:, 1]

    got = jax.jit(lambda x: gradients.integrated_gradients(f, x, steps=24, rule=rule))(e)
    assert np.abs(want).max() > 1e-3  # the comparison is not between two near-zero arrays
    np.testing.assert_allclose(got, want, atol=IG_TOL, rtol=0)


def test_integrated_gradients_vit_pixels_match_captum(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=24,
                                 num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=40, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    ref = transformers.ViTModel(cfg).eval()
    ref.save_pretrained(tmp_path / "vit")
    model, variables = hf.load(tmp_path / "vit")
    x = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
    ig = captum.attr.IntegratedGradients(lambda p: ref(pixel_values=p).pooler_output[:, 2])
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    want = ig.attribute(tx, baselines=torch.zeros_like(tx), n_steps=24).permute(0, 2, 3, 1)
    got = jax.jit(lambda x: gradients.integrated_gradients(
        lambda p: model.apply(variables, p)["pooler_output"][:, 2], x, steps=24))(x)
    assert np.abs(want.numpy()).max() > 1e-3
    np.testing.assert_allclose(got, want.detach().numpy(), atol=IG_TOL, rtol=0)


@pytest.mark.slow
def test_integrated_gradients_completeness() -> None:
    """Per modality, the attributions sum to p(x) - p(baseline) within 1 %: pixels against a
    zero image, token embeddings against zero embeddings (64 Gauss-Legendre nodes)."""
    model, variables, batch = _model("cross_attention")
    em, ev = capture.explained_model(model, variables)
    perturb = capture.zero_perturbations(em, ev, batch)
    out = _jit(methods.integrated_gradients, em, "answer", steps=64)(ev, batch, perturb)
    target = out["target"][:, None]
    p_full = np.take_along_axis(np.asarray(out["probs"]), target, 1)[:, 0]
    emb = methods._embeddings(em, ev, batch, perturb, "text")
    baselines = {
        "image": ({**batch, "image": np.zeros_like(batch["image"])}, perturb),
        "text": (batch, capture.with_perturbation(perturb, "text/token_embeddings", -emb)),
    }
    apply = jax.jit(lambda v, b, p: em.apply({**v, "perturbations": p}, b))
    for modality, (base, p) in baselines.items():
        p_base = jax.nn.softmax(apply(ev, base, p)["answer"]["logits"])
        p_base = np.take_along_axis(np.asarray(p_base), target, 1)[:, 0]
        total = np.asarray(out["scores"][modality]).reshape(3, -1).sum(-1)
        assert np.abs(p_full - p_base).min() > 1e-3
        np.testing.assert_allclose(total, p_full - p_base, rtol=0.01, err_msg=modality)


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float64))


def _chefer_reference(cap: dict, text_len: int, image_len: int, b: int) -> tuple:
    """The rules of Chefer et al.'s LXMERT code (avg_heads, apply_self_attention_rules,
    apply_mm_attention_rules, handle_residual), transcribed to torch for one example."""
    def avg_heads(cam, grad):
        return (grad * cam).clamp(min=0).mean(dim=0)

    def handle_residual(r):
        r = r - torch.eye(r.shape[-1], dtype=r.dtype)
        s = r.sum(dim=-1, keepdim=True)
        r = r / torch.where(s > 0, s, torch.ones_like(s))
        return r + torch.eye(r.shape[-1], dtype=r.dtype)

    a, g = cap["attention"], cap["grads"]
    r_ii = torch.eye(image_len, dtype=torch.float64)
    cam = avg_heads(_t(a["image/encoder/layer_0/attn"][b]), _t(g["image/encoder/layer_0/attn"][b]))
    r_ii = r_ii + cam @ r_ii
    r_tt = torch.eye(text_len, dtype=torch.float64)
    cam = avg_heads(_t(a["text/encoder/layer_0/attn"][b]), _t(g["text/encoder/layer_0/attn"][b]))
    r_tt = r_tt + cam @ r_tt
    r_ti = torch.zeros(text_len, image_len, dtype=torch.float64)
    for i in range(2):
        p = f"fusion/encoder/layer_{i}/"
        cam = avg_heads(_t(a[p + "attn"][b]), _t(g[p + "attn"][b]))
        r_tt, r_ti = r_tt + cam @ r_tt, r_ti + cam @ r_ti
        cam = avg_heads(_t(a[p + "cross_attn"][b]), _t(g[p + "cross_attn"][b]))
        r_ti = r_ti + handle_residual(r_tt).t() @ cam @ handle_residual(r_ii)
    return r_tt[0].numpy(), r_ti[0].numpy()


@pytest.mark.slow
def test_relevance_matches_chefer_rules() -> None:
    model, variables, batch = _model("cross_attention")
    em, ev = capture.explained_model(model, variables)
    perturb = capture.zero_perturbations(em, ev, batch)
    out = _jit(methods.attention_method, em, "answer", gradient=True)(ev, batch, perturb)
    cap = _jit(capture.capture, em, "answer")(ev, batch, perturb)
    for b in range(3):
        want_text, want_image = _chefer_reference(cap, 8, 6, b)
        np.testing.assert_allclose(out["scores"]["text"][b], want_text, atol=1e-5)
        np.testing.assert_allclose(out["scores"]["image"][b], want_image, atol=1e-5)
        assert np.abs(want_image).max() > 1e-4


@pytest.mark.slow
def test_attention_gradients_are_the_logit_gradients() -> None:
    model, variables, batch = _model("concat")
    em, ev = capture.explained_model(model, variables)
    perturb = capture.zero_perturbations(em, ev, batch)
    cap = _jit(capture.capture, em, "answer")(ev, batch, perturb)
    point, eps = "fusion/encoder/layer_1/attn", 1e-3
    direction = jax.random.normal(jax.random.PRNGKey(5), cap["attention"][point].shape)

    def logit(scale: float) -> float:
        p = capture.with_perturbation(perturb, f"{point}/attention", scale * direction)
        logits = em.apply({**ev, "perturbations": p}, batch)["answer"]["logits"]
        return float(np.take_along_axis(np.asarray(logits), np.asarray(cap["target"])[:, None],
                                        1).sum())

    numeric = (logit(eps) - logit(-eps)) / (2 * eps)
    np.testing.assert_allclose(float((cap["grads"][point] * direction).sum()), numeric,
                               rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["concat", "co_attention", "late"])
def test_relevance_and_rollout_cover_every_fusion(kind: str) -> None:
    model, variables, batch = _model(kind)
    em, ev = capture.explained_model(model, variables)
    perturb = capture.zero_perturbations(em, ev, batch)
    for gradient in (True, False) if kind == "concat" else (True,):  # rollout: one kind
        out = _jit(methods.attention_method, em, "answer", gradient=gradient)(ev, batch,
                                                                              perturb)
        assert out["scores"]["image"].shape == (3, 6)
        assert out["scores"]["text"].shape == (3, 8)
        assert np.isfinite(out["scores"]["image"]).all()
        assert np.asarray(out["scores"]["image"]).std(-1).min() > 0  # not a constant map


def test_rollout_is_abnar_zuidema_on_a_single_stream() -> None:
    a = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 1, 3, 5, 5)), -1)
    rules = relevance.Rules({f"image/encoder/layer_{i}/attn": a[i] for i in range(2)}, {}, False)
    got = relevance.tower(rules, "image", 5, 1)
    want = np.eye(5)
    for i in range(2):  # Abnar & Zuidema: (0.5 A + 0.5 I), rows normalised, multiplied up
        m = 0.5 * np.asarray(a[i, 0]).mean(0) + 0.5 * np.eye(5)
        want = (m / m.sum(-1, keepdims=True)) @ want
    np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_occlusion_is_the_probability_drop() -> None:
    model, variables, batch = _model("cross_attention")
    em, ev = capture.explained_model(model, variables)
    perturb = capture.zero_perturbations(em, ev, batch)
    out = _jit(methods.occlusion, em, "answer", patch=8)(ev, batch, perturb)
    assert out["scores"]["image"].shape == (3, 2, 3) and out["scores"]["text"].shape == (3, 8)
    t = np.asarray(out["target"])

    def prob(b):
        p = jax.nn.softmax(model.apply(variables, b)["answer"]["logits"])
        return np.take_along_axis(np.asarray(p), t[:, None], 1)[:, 0]

    full = prob(batch)
    img = batch["image"].copy()
    img[:, 8:16, 16:24] = 0.0  # patch (row 1, col 2)
    np.testing.assert_allclose(out["scores"]["image"][:, 1, 2], full - prob({**batch,
                               "image": img}), atol=1e-5)


def test_modality_contributions_and_shapley() -> None:
    model, variables, batch = _model("cross_attention")
    probs = lambda b: np.asarray(jax.nn.softmax(model.apply(variables, b)["answer"]["logits"]))
    t = probs(batch).argmax(-1)
    prob = lambda b: jnp.asarray(np.take_along_axis(probs(b), t[:, None], 1)[:, 0])
    got = contributions.contributions(prob, batch, ["image", "text"])
    # Absent = present False: the model puts its learned stand-in in place of the image, so
    # the placeholder's values do not matter.
    absent = {"image": np.zeros(len(t), bool)}
    no_image = {**batch, "present": absent}
    np.testing.assert_allclose(got["image"], prob(batch) - prob(no_image), atol=1e-6)
    other = {**no_image, "image": np.random.default_rng(5).normal(size=batch["image"].shape)}
    np.testing.assert_allclose(prob(other), prob(no_image), atol=1e-6)
    assert np.abs(got["image"]).max() > 1e-4  # the image matters to this random model
    # Shapley on a known game: v(S) = sum of weights plus a pairwise interaction split evenly.
    w = {"a": 0.1, "b": 0.3, "c": -0.2}
    fake = {m: np.ones((2,), np.float32) for m in w}

    def value(b):
        present = b.get("present", {})
        on = {m: np.asarray(present.get(m, np.ones(2, bool))) for m in w}
        return jnp.asarray(sum(w[m] * on[m] for m in w) + 0.4 * (on["a"] & on["b"]))

    shap = contributions.contributions(value, fake, list(w))
    np.testing.assert_allclose([shap["a"][0], shap["b"][0], shap["c"][0]], [0.3, 0.5, -0.2],
                               atol=1e-6)


def test_layer_view_statistics() -> None:
    a = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (3, 4, 6)), -1),
                   np.float64)
    np.testing.assert_allclose(views.head_entropy(a), scipy.stats.entropy(a, axis=-1).mean(-1),
                               atol=1e-9)
    from sklearn.decomposition import PCA
    x = np.random.default_rng(0).normal(size=(16, 8))
    proj = PCA(3).fit_transform(x)
    rgb = views.pca_rgb(x)
    for c in range(3):
        ref = (proj[:, c] - proj[:, c].min()) / np.ptp(proj[:, c])
        assert np.allclose(rgb[:, c], ref, atol=1e-9) or np.allclose(rgb[:, c], 1 - ref,
                                                                      atol=1e-9)


@pytest.mark.slow
def test_three_modalities_with_audio() -> None:
    """An AST audio tower beside image and text (concat fusion): relevance maps onto its patch
    grid (mels x time), and the modality contributions are Shapley values (their sum is
    p(all) - p(none), efficiency). Occlusion and integrated gradients treat the features as
    they treat pixels (the image tests)."""
    from mmjax.interpret.explain import explain_batch

    cfg = {
        "encoders": {
            "image": {"kind": "vit", "variant": "mu/8", "width": 16, "depth": 1, "num_heads": 2,
                      "mlp_dim": 32},
            "text": {"kind": "text", "variant": "mu", "width": 16, "depth": 0, "num_heads": 2,
                     "mlp_dim": 32, "vocab_size": 30, "max_len": 8},
            "audio": {"kind": "ast", "variant": "mu", "width": 16, "depth": 1, "num_heads": 2,
                      "mlp_dim": 32, "patch_size": 8, "frequency_stride": 8, "time_stride": 4},
        },
        "fusion": {"kind": "concat", "width": 16, "depth": 1, "num_heads": 2},
        "heads": {"answer": {"kind": "classification", "num_classes": 3}},
    }
    model = build_model(cfg)
    rng = np.random.default_rng(7)
    batch = {"image": rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
             "text": {"ids": rng.integers(5, 30, (2, 8)).astype(np.int32),
                      "mask": np.ones((2, 8), np.int32)},
             "audio": rng.normal(size=(2, 20, 24)).astype(np.float32)}  # [B, frames, mels]
    variables = model.init(jax.random.PRNGKey(0), batch)
    out_p = variables["params"]["heads"]["answer"]["out"]
    out_p["kernel"] = jax.random.normal(jax.random.PRNGKey(2), out_p["kernel"].shape)
    em, ev = capture.explained_model(model, variables)
    perturb = capture.zero_perturbations(em, ev, batch)
    names = ["audio", "image", "text"]
    rel = jax.jit(lambda v, b, p: explain_batch(em, "answer", "relevance", names, {}, v, b, p))(
        ev, batch, perturb)
    assert encoders.token_grid(layout.tower(em, "audio"), (20, 24),
                               rel["scores"]["audio"].shape[1]) == (3, 4)
    assert layout.to_map(em, "audio", np.asarray(rel["scores"]["audio"][0]), (20, 24)).shape \
        == (3, 4)
    probs = np.asarray(rel["probs"])
    t = np.asarray(rel["target"])
    none = contributions.without(batch, names)
    p_none = np.asarray(jax.nn.softmax(jax.jit(em.apply)(ev, none)["answer"]["logits"]))
    total = sum(np.asarray(rel["modalities"][m]) for m in names)
    np.testing.assert_allclose(total, probs[np.arange(2), t] - p_none[np.arange(2), t],
                               atol=1e-5)
