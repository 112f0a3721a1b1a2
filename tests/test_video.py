"""Video: decoding real clips (H.264 mp4, VP9 webm, MPEG-4 avi, mkv) with PyAV, temporal
sampling, seeking in long files, a video's soundtrack as audio, bad files named, TFDS ``Video``
features, the video ops,
corruptions, and the ViViT tower (shapes, and inflation from an image ViT, exact)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mmjax import modalities
from mmjax.data import folder
from mmjax.models.video import ViViT, inflate_params
from mmjax.models.vit import ViT
from mmjax.pp import audio as audio_pp
from mmjax.pp import ops
from mmjax.pp import video as video_pp
from tests.video_clips import frame_index, level_frames, write_clip

CODECS = [("clip.mp4", "libx264"), ("clip.webm", "libvpx-vp9"), ("clip.avi", "mpeg4"),
          ("clip.mkv", "libx264")]


@pytest.mark.parametrize("name,codec", CODECS)
def test_windows_of_every_container_are_the_right_frames(tmp_path, name, codec):
    path = str(write_clip(tmp_path / name, level_frames(30), codec=codec))
    s = video_pp.Sampling(num_frames=5, stride=3)
    info = video_pp.probe(path, s)
    assert (info.num_frames, info.fps, info.width, info.height) == (30, 10.0, 48, 32)
    centre = video_pp.decode_video(path, s, "center")
    assert centre.shape == (5, 32, 48, 3) and centre.dtype == np.uint8
    np.testing.assert_array_equal(frame_index(centre), (30 - 13) // 2 + 3 * np.arange(5))
    starts = set()
    for seed in range(6):
        clip = video_pp.decode_video(path, s, "random", np.random.default_rng(seed))
        idx = frame_index(clip)
        np.testing.assert_array_equal(np.diff(idx), 3)
        assert 0 <= idx[0] <= 30 - 13
        starts.add(int(idx[0]))
    assert len(starts) >= 3  # the window moves
    # fps: 4 frames at 5 per second from a 10 fps clip are every other frame.
    by_rate = video_pp.decode_video(path, video_pp.Sampling(num_frames=4, fps=5.0), "center")
    np.testing.assert_array_equal(np.diff(frame_index(by_rate)), 2)


def test_a_long_file_is_seeked_to_the_window(tmp_path):
    # 30 s at 10 fps with a keyframe every 12 frames: a window near the end is found by
    # seeking, and is exactly the frames asked for.
    path = str(write_clip(tmp_path / "long.mp4", level_frames(300, 16, 16)))
    info = video_pp.probe(path, video_pp.Sampling())
    idx = np.array([283, 285, 287, 290, 290])
    frames = video_pp.read_frames(path, idx, info)
    np.testing.assert_array_equal(frame_index(frames), idx)
    s = video_pp.Sampling(num_frames=4, stride=5)
    clip = video_pp.decode_video(path, s, "random", np.random.default_rng(3))
    start = frame_index(clip)[0]
    np.testing.assert_array_equal(frame_index(clip), start + 5 * np.arange(4))


def test_a_videos_soundtrack_is_its_audio(tmp_path):
    path = write_clip(tmp_path / "talk.mp4", level_frames(20), audio_hz=440.0)
    x = audio_pp.decode_audio(str(path), 16000)
    assert abs(len(x) / 16000 - 2.0) < 0.1  # the 2 s of the clip
    spectrum = np.abs(np.fft.rfft(x[2000:18000]))
    peak = np.fft.rfftfreq(16000, 1 / 16000)[np.argmax(spectrum)]
    assert abs(peak - 440.0) < 2.0, peak
    silent = write_clip(tmp_path / "silent.mp4", level_frames(20))
    with pytest.raises(ValueError, match="no audio stream"):
        audio_pp.decode_audio(str(silent), 16000)


def _write_set(root, lines):
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_bad_videos_are_named_and_skipped(tmp_path):
    write_clip(tmp_path / "good.mp4", level_frames(20))
    write_clip(tmp_path / "short.webm", level_frames(4), codec="libvpx-vp9")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(200)))
    import soundfile

    soundfile.write(tmp_path / "sound.wav", np.sin(np.arange(8000) / 5.0), 16000)
    lines = [{"video": "good.mp4", "text": "a", "label": "x"},
             {"video": "missing.mp4", "text": "b", "label": "x"},
             {"video": "broken.mp4", "text": "c", "label": "y"},
             {"video": "sound.wav", "text": "d", "label": "y"},
             {"video": "short.webm", "text": "e", "label": "y"}]
    root = _write_set(tmp_path, lines)
    ctx = ops.Context(data={"video": {"num_frames": 4, "stride": 2}})
    want = [r"train\.jsonl:2: video file .*missing\.mp4 not found",
            r"train\.jsonl:3: cannot decode video file .*broken\.mp4",
            r"train\.jsonl:4: cannot decode video file .*sound\.wav: no video stream",
            r"train\.jsonl:5: cannot decode video file .*short\.webm: too few frames: 4"]
    for i, pattern in enumerate(want):
        _write_set(root, [lines[0], *lines[1:][i:i + 1]])
        for_line = pattern.replace(r"train\.jsonl:" + pattern.split(":")[1], r"train\.jsonl:2")
        with pytest.raises(folder.BadDataError, match=for_line):
            folder.FolderSource(root, "train", ctx=ctx)
    _write_set(root, lines)
    src = folder.FolderSource(root, "train", ctx=ctx, skip_bad=True)
    assert len(src) == 1 and src.skipped == 4 and src.modalities() == ("text", "video")


def test_frame_size_limit_is_read_from_the_header(tmp_path):
    write_clip(tmp_path / "big.mp4", level_frames(8, 64, 64))
    with pytest.raises(ops.LimitError, match="64x64"):
        video_pp.probe(str(tmp_path / "big.mp4"), video_pp.Sampling(num_frames=2), 4000)


def test_a_tfds_video_feature_is_the_video_modality(tmp_path):
    """A TFDS ``Video`` feature (frames stored as PNGs) reaches batches through the same ops:
    the eval batch holds each clip's centre window, the train batch a window of the clip."""
    import ml_collections

    from mmjax.data import pipeline
    from tests import tfds_audio_builder, tfds_video_builder

    cfg = ml_collections.ConfigDict({
        "name": "tfds", "tfds_name": "mmjax_levels", "data_dir": str(tmp_path),
        "video_key": "video", "text_key": "", "text": "how long?", "label_key": "label",
        "train_split": "train", "val_split": "val", "test_split": "test", "max_len": 4,
        "tokenizer": "", "vocab_size": 20, "cache": True,
        "pp_train": "tokenize|decode_video|video_resize",
        "pp_eval": "tokenize|decode_video(window='center')|video_resize",
        "video": {"num_frames": 4, "stride": 3, "fps": 0.0, "size": 8},
    })
    with tfds_audio_builder.without_tensorflow():
        tfds_video_builder.build(str(tmp_path))
        import tensorflow_datasets as tfds

        # the frame counts as TFDS stores them (it shuffles the examples when writing)
        lengths = {s: [len(r["video"]) for r in tfds.data_source(
            "mmjax_levels", split=s, data_dir=str(tmp_path))] for s in ("train", "val")}
        tok = pipeline.build_tokenizer(cfg)
        assert pipeline.modalities(cfg) == ("text", "video")
        val = next(iter(pipeline.eval_batches(cfg, "val", batch_size=4, tokenizer=tok)))
        train = next(pipeline.train_iterator(cfg, batch_size=4, seed=0, tokenizer=tok))
    assert val["video"].shape == (4, 4, 8, 8, 3) and val["video"].dtype == np.uint8
    covered = 3 * 3 + 1
    assert sorted(lengths["val"]) == [tfds_video_builder.length("val", i) for i in range(4)]
    for b, n in enumerate(lengths["val"]):
        np.testing.assert_array_equal(frame_index(val["video"][b]),
                                      (n - covered) // 2 + 3 * np.arange(4))
        assert int(val["label"][b]) == n % 2
    for clip in train["video"]:  # some window of the clip, frames 3 apart
        idx = frame_index(clip)
        np.testing.assert_array_equal(np.diff(idx), [3, 3, 3])
        assert idx[0] >= 0 and idx[-1] < max(lengths["train"])


def test_spatial_ops_treat_every_frame_alike():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    clip = np.repeat(frame[None], 6, 0)
    ctx = ops.Context(data={"video": {"num_frames": 6, "size": 16}})
    chain = ops.parse("decode_video|video_random_crop(0.3)|video_flip(1.0)", ctx)
    for seed in range(3):
        out = ops.apply(chain, {"video": clip}, np.random.default_rng(seed))["video"]
        assert out.shape == (6, 16, 16, 3)
        assert all((f == out[0]).all() for f in out)  # one box, one flip for all frames
    flipped = ops.apply(ops.parse("video_flip(1.0)", ctx), {"video": clip},
                        np.random.default_rng(0))["video"]
    np.testing.assert_array_equal(flipped, clip[:, :, ::-1])
    resized = ops.apply(ops.parse("video_center_crop", ctx), {"video": clip}, None)["video"]
    assert resized.shape == (6, 16, 16, 3)
    # frames already decoded (TFDS Video features) are sampled like a file's
    many = level_frames(20)
    got = ops.apply(ops.parse("decode_video(window='center')", ctx), {"video": many},
                    None)["video"]
    np.testing.assert_array_equal(frame_index(got), (20 - 11) // 2 + 2 * np.arange(6))


def test_corruptions_act_per_frame_and_drop_frames():
    clips = level_frames(10, 8, 8)[None].repeat(2, 0)
    video = modalities.get("video")
    dropped = video.corruptions["frame_drop"].apply(clips, 5, np.random.default_rng(0), None)
    idx = np.stack([frame_index(c) for c in dropped])
    assert (idx[:, 0] == 0).all() and (np.diff(idx, axis=1) >= 0).all()
    assert ((idx == np.arange(10)).sum(1) == 10 - 4).all()  # 0.5 x 9 rounded: 4 dropped
    noisy = video.corruptions["video_gaussian_noise"].apply(clips, 3, np.random.default_rng(0),
                                                            None)
    assert noisy.shape == clips.shape and noisy.dtype == np.uint8
    assert 10 < np.abs(noisy.astype(float) - clips).mean() < 60
    scaled = video.corruptions["video_contrast"].apply(clips / 127.5 - 1, 1, None, None)
    assert scaled.dtype == np.float64 and scaled.min() >= -1


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["joint", "factorised"])
def test_vivit_tokens(attention):
    model = ViViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, tubelet=2,
                  attention=attention, class_token=True, pool="cls")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 6, 8, 12, 3)).astype(np.float32)
    out = jax.jit(model.apply)(model.init(jax.random.key(0), x), x)
    n = 1 + (3 * 2 * 3 if attention == "joint" else 3)
    assert out["tokens"].shape == (2, n, 32) and out["pooled"].shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(out["pooled"]), np.asarray(out["tokens"][:, 0]))
    assert model.flops(x.shape[1:])[1:] == (n, 32)
    # the explainers' grid: rows of tubelet maps stacked in time, over the frames' strip
    rows, cols = model.token_grid((6 * 8, 12, 3), n)
    assert (rows, cols) == ((3 * 2, 3) if attention == "joint" else (3, 1))


def test_a_conv_stem_embeds_like_torch():
    """``stem=2``: two 3x3 stride-2 convolutions (padding 1, tanh GELU) per frame, then the
    tubelet embedding over a quarter of the patch, against the same layers in torch; the
    token grid and the FLOP count follow the strided shapes."""
    torch = pytest.importorskip("torch")
    model = ViViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, tubelet=2, stem=2)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 4, 16, 24, 3)).astype(np.float32)
    variables = model.init(jax.random.key(3), x)
    out, inter = model.apply(variables, x, capture_intermediates=lambda m, _: m.name ==
                             "embedding")
    got = np.asarray(inter["intermediates"]["embedding"]["__call__"][0])
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a, np.float64)), variables["params"])
    h = torch.from_numpy(x.astype(np.float64)).flatten(0, 1).permute(0, 3, 1, 2)
    for i in range(2):
        w = p[f"stem_{i}"]["kernel"][0].permute(3, 2, 0, 1)
        conv = torch.nn.functional.conv2d(h, w, p[f"stem_{i}"]["bias"], stride=2, padding=1)
        h = torch.nn.functional.gelu(conv, approximate="tanh")
    h = h.unflatten(0, (2, 4)).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
    w = p["embedding"]["kernel"].permute(4, 3, 0, 1, 2)
    want = torch.nn.functional.conv3d(h, w, p["embedding"]["bias"], stride=2)
    want = want.permute(0, 2, 3, 4, 1).numpy()
    assert got.shape == want.shape == (2, 2, 2, 3, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert out["tokens"].shape == (2, 2 * 2 * 3, 32)
    stem_flops = 2 * (4 * 8 * 12 * 9 * 3 * 8 + 4 * 4 * 6 * 9 * 8 * 16)
    plain = ViViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, tubelet=2)
    embed_saved = 2 * 2 * 2 * 3 * 32 * (2 * 8 * 8 * 3 - 2 * 2 * 2 * 16)
    assert model.flops(x.shape[1:])[0] == plain.flops(x.shape[1:])[0] + stem_flops - embed_saved
    with pytest.raises(ValueError, match="stem=3"):
        ViViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, stem=3).init(
            jax.random.key(0), x)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["central", "mean"])
def test_an_inflated_image_vit_sees_the_image(how):
    """A ViViT made from a ViT (joint attention, zero temporal positions) gives the ViT's
    tokens on a clip that shows the image: the mean kernel on a still clip, the central one on
    the tubelets' central frames (the others random)."""
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
    vit = ViT(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, pos_embedding_std=0.5)
    vparams = vit.init(jax.random.key(0), image)["params"]
    vivit = ViViT(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, tubelet=3)
    clip = np.repeat(image[:, None], 6, 1)
    if how == "central":
        clip[:, [0, 2, 3, 5]] = rng.uniform(-1, 1, (2, 4, 8, 12, 3))
    params = dict(vivit.init(jax.random.key(1), clip)["params"])
    params.update(inflate_params(vparams, 3, how))
    params["time_embedding"] = np.zeros_like(params["time_embedding"])
    got = jax.jit(vivit.apply)({"params": params}, clip)["tokens"]
    want = jax.jit(vit.apply)({"params": vparams}, image)["tokens"]
    np.testing.assert_allclose(np.asarray(got[:, :6]), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got[:, 6:]), np.asarray(want), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["concat", "cross_attention", "co_attention", "late",
                                  "bottleneck"])
def test_every_fusion_kind_reads_the_video(kind):
    """Video + audio + text (co-attention: video + text, it pairs two) under each fusion kind:
    the answer moves when any one input changes."""
    from mmjax.models.multimodal import build_model

    encoders = {
        "video": {"kind": "vivit", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                  "patch_size": 4, "tubelet": 2},
        "text": {"kind": "text", "variant": "mu", "width": 32, "depth": 1, "num_heads": 2,
                 "mlp_dim": 64, "vocab_size": 60, "max_len": 8},
        "audio": {"kind": "ast", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                  "patch_size": 4, "frequency_stride": 4, "time_stride": 4},
    }
    if kind == "co_attention":
        del encoders["audio"]
    model = build_model({"encoders": encoders, "fusion": {
        "kind": kind, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
        "heads": {"answer": {"kind": "classification", "num_classes": 5}}})

    def batch(seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return {"video": rng.integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8),
                "text": {"ids": rng.integers(5, 60, (3, 8)).astype(np.int32),
                         "mask": np.ones((3, 8), np.int32)},
                "audio": rng.normal(size=(3, 12, 8)).astype(np.float32)}

    b0 = {k: v for k, v in batch(0).items() if k in encoders}
    params = jax.jit(model.init)(jax.random.key(0), b0)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                 for k, x in zip(keys, leaves, strict=True)])
    apply = jax.jit(lambda b: model.apply({"params": params}, b)["answer"]["logits"])
    base = np.asarray(apply(b0))
    assert np.isfinite(base).all()
    for m in encoders:
        moved = np.abs(np.asarray(apply({**b0, m: batch(1)[m]})) - base).max()
        assert moved > 1e-3, (kind, m)
