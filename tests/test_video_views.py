"""Evaluation over several views of a clip (``data.video.num_clips`` x ``num_crops``): which
frames and crops the views are, that the model averages class probabilities over them, and that
one view is exactly the centre window evaluated before views existed."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from mmjax.inference import answer
from mmjax.models import views
from mmjax.models.multimodal import build_model
from mmjax.pp import ops
from mmjax.pp import video as video_pp
from tests.video_clips import frame_index, level_frames, write_clip


def _ctx(**video: float) -> ops.Context:
    return ops.Context(data=ml_collections.ConfigDict({"video": video}))


def _eval_op(**video: float) -> ops.Op:
    return ops.parse("decode_video(window='center')", _ctx(**video))[0]


@pytest.mark.parametrize("n,stride,frames,clips,crops", [
    (40, 3, 4, 3, 1), (31, 2, 5, 4, 1), (13, 2, 5, 2, 1), (9, 1, 9, 3, 1), (30, 3, 4, 1, 3),
    (31, 2, 4, 2, 3)])
def test_windows_are_spread_evenly_over_a_real_clip(tmp_path, n, stride, frames, clips, crops):
    path = write_clip(tmp_path / "c.mp4", level_frames(n, 16, 24))
    video = _eval_op(num_frames=frames, stride=stride, num_clips=clips, num_crops=crops,
                     size=16)({"video": str(path)})["video"]
    assert video.shape == (clips * crops, frames, 16, 16 if crops > 1 else 24, 3)
    assert video.dtype == np.uint8
    covered = (frames - 1) * stride + 1
    # one window: the centre one; several: the first at frame 0, the last ending on the last
    # frame, the others evenly between
    starts = np.floor(np.linspace(0, n - covered, clips) + 1e-9).astype(int) if clips > 1 \
        else np.asarray([(n - covered) // 2])
    want = starts[:, None] + stride * np.arange(frames)[None]
    got = np.stack([frame_index(v) for v in video]).reshape(clips, crops, frames)
    np.testing.assert_array_equal(got, np.broadcast_to(want[:, None], got.shape))
    np.testing.assert_array_equal(
        video_pp.clip_starts(n, video_pp.Sampling(frames, stride, num_clips=clips), 0.0), starts)


@pytest.mark.parametrize("h,w,crops", [(12, 20, 3), (20, 12, 3), (12, 19, 3), (10, 30, 4),
                                       (12, 20, 1)])
def test_crops_are_the_ends_and_centre_of_the_longer_side(h, w, crops):
    # Each pixel holds its own column (red) and row (green): a crop's first pixel is its offset.
    frames = np.zeros((6, h, w, 3), np.uint8)
    frames[..., 0] = np.arange(w)[None, None, :]
    frames[..., 1] = np.arange(h)[None, :, None]
    side = min(h, w)
    video = _eval_op(num_frames=6, stride=1, num_crops=crops, num_clips=2, size=side)(
        {"video": frames})["video"]
    offsets = np.floor(np.linspace(0, max(h, w) - side, crops) + 1e-9).astype(int) \
        if crops > 1 else np.asarray([(max(h, w) - side) // 2])
    if crops == 1:  # no crop: the whole frames, as the spatial ops of pp_eval then take them
        assert video.shape == (2, 6, h, w, 3)
        return
    assert video.shape == (2 * crops, 6, side, side, 3)
    along = 0 if w >= h else 1
    got = video[:, 0, 0, 0, along].reshape(2, crops)  # clip-major: views of clip 0, then 1
    np.testing.assert_array_equal(got, np.stack([offsets, offsets]))
    np.testing.assert_array_equal(video[:, :, :, :, along] - got.reshape(-1)[:, None, None, None],
                                  np.broadcast_to(np.arange(side)[None, None, :]
                                                  if along == 0 else
                                                  np.arange(side)[None, :, None],
                                                  video.shape[:-1]))


def _model_and_params(seed: int = 0) -> tuple:
    model = build_model({"encoders": {
        "video": {"kind": "vivit", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
                  "patch_size": 4, "tubelet": 2},
        "text": {"kind": "text", "variant": "mu", "width": 16, "depth": 1, "num_heads": 2,
                 "mlp_dim": 32, "vocab_size": 40, "max_len": 6}},
        "fusion": {"kind": "cross_attention", "width": 16, "depth": 1, "num_heads": 2,
                   "mlp_dim": 32},
        "heads": {"answer": {"kind": "classification", "num_classes": 5}}})
    rng = np.random.default_rng(seed)
    b = {"video": rng.integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8),
         "text": {"ids": rng.integers(4, 40, (2, 6)).astype(np.int32),
                  "mask": np.ones((2, 6), np.int32)}}
    # random weights of the model's shapes (no init to compile): views give distinct answers
    shapes = jax.eval_shape(model.init, jax.random.key(seed), b)["params"]
    params = jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(x.dtype), shapes)
    return model, {"params": params}


def test_the_answer_is_the_mean_of_each_views_probabilities():
    model, variables = _model_and_params()
    rng = np.random.default_rng(7)
    b, v = 3, 6
    batch = {"video": rng.integers(0, 256, (b, v, 4, 8, 8, 3), dtype=np.uint8),
             "text": {"ids": rng.integers(4, 40, (b, 6)).astype(np.int32),
                      "mask": (np.arange(6)[None] < rng.integers(2, 7, (b, 1))).astype(np.int32)},
             "present": {"video": np.array([True, True, False]),
                         "text": np.array([True, False, True])}}
    # the reference: the plain model on one view at a time, its softmax averaged here
    one = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x)["answer"]["logits"]))
    each = np.stack([np.asarray(one({**batch, "video": batch["video"][:, i]}))
                     for i in range(v)])
    want = each.mean(axis=0)
    assert each.std(axis=0).max() > 1e-2  # the views disagree: a wrong average could not pass
    # what predict computes (``answer.output_fn``: the softmax of the eval step's logits)
    fn = jax.jit(answer.output_fn(model, "answer", "classification"))
    np.testing.assert_allclose(np.asarray(fn(variables, batch)["probs"]), want, rtol=1e-5,
                               atol=1e-7)


def test_contrastive_embeddings_of_views_are_their_normalised_mean():
    model = build_model({"encoders": {
        "video": {"kind": "vivit", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
                  "patch_size": 4, "tubelet": 2}},
        "heads": {"itc": {"kind": "contrastive", "embed_dim": 8, "modalities": ("video",)}}})
    rng = np.random.default_rng(2)
    video = rng.integers(0, 256, (2, 3, 4, 8, 8, 3), dtype=np.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), {"video": video[:, 0]})["params"]
    variables = {"params": jax.tree.map(
        lambda x: (0.5 * rng.normal(size=x.shape)).astype(x.dtype), shapes)}
    def embed(m: object, x: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(lambda x: m.apply(  # type: ignore[attr-defined]
            variables, x, task="itc", method="embed")["video_embeds"])({"video": x}))

    each = np.stack([embed(model, video[:, v]) for v in range(3)])
    want = each.mean(0) / np.linalg.norm(each.mean(0), axis=-1, keepdims=True)
    got = embed(model, video)  # the same model, given views
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_one_view_is_exactly_the_centre_window_of_before(tmp_path):
    path = write_clip(tmp_path / "c.mp4", level_frames(30, 16, 24))
    s = video_pp.Sampling(num_frames=4, stride=3, size=16)
    before = video_pp.decode_video(str(path), s, "center")  # the centre window, as ever
    np.testing.assert_array_equal(frame_index(before), (30 - 10) // 2 + 3 * np.arange(4))
    for keys in ({}, {"num_clips": 1, "num_crops": 1}):
        got = _eval_op(num_frames=4, stride=3, size=16, **keys)({"video": str(path)})["video"]
        assert got.shape == before.shape
        np.testing.assert_array_equal(got, before)
    rng = np.random.default_rng(1)
    assert views.count({"video": rng.integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)}) == 1
    # a single-view copy of a config with views, for export and explanations
    data = ml_collections.ConfigDict({"video": {"num_clips": 3, "num_crops": 3}})
    single = video_pp.single_view(data)
    assert (single.video.num_clips, single.video.num_crops) == (1, 1)
    assert (data.video.num_clips, data.video.num_crops) == (3, 3)


def test_corruptions_act_on_each_view_of_a_clip():
    """``evaluate --corrupt`` on batches with views: shapes kept, frames never cross views."""
    from mmjax import modalities

    clips = np.zeros((2, 3, 6, 8, 8, 3), np.uint8)
    clips += (np.arange(2 * 3 * 6).reshape(2, 3, 6) * 4).astype(np.uint8)[..., None, None, None]
    video = modalities.get("video")
    rng = np.random.default_rng(0)
    dropped = video.corruptions["frame_drop"].apply(clips, 5, rng, None)
    assert dropped.shape == clips.shape
    for b in range(2):
        for v in range(3):
            own = set(clips[b, v, :, 0, 0, 0].tolist())
            assert set(dropped[b, v, :, 0, 0, 0].tolist()) <= own
            assert len(set(dropped[b, v, :, 0, 0, 0].tolist())) < len(own)  # some frames gone
    noisy = video.corruptions["video_gaussian_noise"].apply(clips, 3, rng, None)
    assert noisy.shape == clips.shape and noisy.dtype == clips.dtype and (noisy != clips).any()
