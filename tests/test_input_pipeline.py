"""The fast train input path: Inception-style crop boxes, decode-and-crop, uint8 transport.

References: torchvision's ``RandomResizedCrop.get_params`` (transcribed below with torch's RNG:
torchvision's CPU wheel for torch 2.13 is not installable here), Pillow's full decode + crop +
bilinear resize, and the host-side ``x / 127.5 - 1`` the pipeline computed before images went
to the device as uint8.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from sklearn.datasets import load_sample_images

from configs import folder as folder_config
from mmjax.data import pipeline, records
from mmjax.modalities import image as image_modality
from mmjax.pp import image_io as image_lib
from mmjax.pp import ops
from mmjax.trainer import loop
from tests.test_folder import _config, make_dataset


def torchvision_get_params(width: int, height: int, scale: tuple[float, float],
                           ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params (v0.2x), as (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(np.float64)
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
            "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


@pytest.mark.parametrize(("height", "width", "scale"), [(375, 500, (0.6, 1.0)),
                                                         (500, 220, (0.08, 1.0))])
def test_crop_boxes_follow_torchvision_distribution(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    n = 3000
    rng = np.random.default_rng(11)
    ours = np.array([image_lib.inception_box(rng, height, width, scale, ratio)
                     for _ in range(n)])
    torch.manual_seed(5)
    ref = np.array([torchvision_get_params(width, height, scale, ratio) for _ in range(n)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    a, b = _features(ours, height, width), _features(ref, height, width)
    for name in a:
        p = stats.ks_2samp(a[name], b[name]).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2e} against torchvision's boxes"
    assert a["area"].min() >= scale[0] - 0.01 and a["area"].max() <= scale[1] + 0.01


def test_crop_box_fallback_and_square_ratio():
    # A strip no crop of >= 60 % fits in ten tries: torchvision's central fallback.
    rng = np.random.default_rng(0)
    got = image_lib.inception_box(rng, 10, 400, (0.6, 1.0), (3 / 4, 4 / 3))
    assert got == torchvision_get_params(400, 10, (0.6, 1.0), (3 / 4, 4 / 3))
    square = [image_lib.inception_box(rng, 300, 400, (0.2, 1.0), (1.0, 1.0)) for _ in range(50)]
    assert all(h == w for _, _, h, w in square)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Photo JPEGs (crops of scikit-learn's sample photos) at 500x375, and one PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    out = []
    for i, src in enumerate(load_sample_images().images * 3):
        top, left = int(rng.integers(0, 60)), int(rng.integers(0, 120))
        im = Image.fromarray(src[top : top + 360, left : left + 480]).resize((500, 375))
        path = root / (f"{i}.png" if i == 5 else f"{i}.jpg")
        im.save(path, quality=90)
        out.append(path)
    return out


@pytest.mark.parametrize("size", [224, 64])
def test_decode_crop_matches_pillow(photos, size):
    """Against Pillow: full decode, crop, antialiased bilinear resize. At 64 px the JPEG is
    decoded at 1/2 or 1/4 scale (crop edges on that grid); OpenCV resamples, hence the
    tolerance (docs/input_pipeline.md: both are as close to a Lanczos resize)."""
    rng = np.random.default_rng(size)
    for path in photos:
        encoded = image_lib.read_encoded(str(path))
        assert (encoded.height, encoded.width) == (375, 500)
        assert encoded.jpeg == (path.suffix == ".jpg")
        box = image_lib.inception_box(rng, 375, 500, (0.6, 1.0))
        k = image_lib.dct_scale(box, size) if encoded.jpeg else 1  # PNG: no DCT to scale
        assert k == (1 if size == 224 or not encoded.jpeg else 4 if min(box[2:]) >= 256 else 2)
        top, left, h, w = (x * k for x in image_lib.scaled_box(box, k, 375, 500))
        got = image_lib.crop_resize(encoded, box, size).astype(np.float64)
        with Image.open(path) as im:
            full = im.convert("RGB")
        edges = (left, top, min(left + w, 500), min(top + h, 375))
        want = np.asarray(full.resize((size, size), Image.BILINEAR, box=edges), np.float64)
        sharp = np.asarray(full.resize((size, size), Image.LANCZOS, box=edges), np.float64)
        diff = np.abs(got - want)
        assert diff.mean() < 4.0, f"{path.name}: mean |diff| {diff.mean():.2f}"
        assert np.percentile(diff, 99) < 40, f"{path.name}: p99 |diff| {np.percentile(diff, 99)}"
        # As close to a Lanczos resize as Pillow's bilinear is (within one grey level).
        ours, pillows = np.abs(got - sharp).mean(), np.abs(want - sharp).mean()
        assert ours < pillows + 1.0, f"{path.name}: {ours:.2f} vs Pillow's {pillows:.2f}"
        # The same box from decoded pixels (the cache's path) agrees as closely.
        exact = np.asarray(full.resize((size, size), Image.BILINEAR,
                                       box=(box[1], box[0], box[1] + box[3], box[0] + box[2])))
        from_array = image_lib.crop_resize(np.asarray(full), box, size)
        assert np.abs(from_array.astype(np.float64) - exact).mean() < 4.0


def test_dct_scaling_only_when_the_crop_is_twice_the_target(photos, monkeypatch):
    shapes = []
    decode = image_lib.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = decode(*args, **kwargs)
        shapes.append(out.shape[:2])
        return out

    monkeypatch.setattr(image_lib.simplejpeg, "decode_jpeg", spy)
    encoded = image_lib.read_encoded(str(photos[0]))
    box = (20, 30, 300, 400)
    image_lib.crop_resize(encoded, box, 224)  # 300 < 2 * 224: full decode
    image_lib.crop_resize(encoded, box, 140)  # 300 >= 2 * 140: 1/2
    image_lib.crop_resize(encoded, box, 64)  # 300 >= 4 * 64: 1/4
    assert shapes == [(375, 500), (188, 250), (94, 125)]


def test_decode_before_crop_reads_only_the_file(photos):
    chain = ops.parse("decode|random_crop(0.6, 200)|flip", ops.Context())  # 375 < 2 * 200
    lazy = chain[0]({"image": str(photos[0])})["image"]
    assert isinstance(lazy, image_lib.Encoded)
    eager = ops.parse("decode|resize(96)", ops.Context())[0]({"image": str(photos[0])})["image"]
    assert isinstance(eager, np.ndarray) and eager.shape == (375, 500, 3)
    from_file = ops.apply(chain, {"image": str(photos[0])}, np.random.default_rng(7))["image"]
    from_pixels = ops.apply(chain[1:], {"image": eager}, np.random.default_rng(7))["image"]
    assert from_file.shape == (200, 200, 3) and from_file.dtype == np.uint8
    np.testing.assert_array_equal(from_file, from_pixels)  # simplejpeg decodes as Pillow does
    with open(photos[0], "rb") as f:
        as_bytes = ops.apply(chain, {"image": f.read()}, np.random.default_rng(7))["image"]
    np.testing.assert_array_equal(as_bytes, from_file)


def test_op_arguments_and_errors(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    (crop,) = ops.parse("random_crop(0.5, 16, ratio=(1, 1))", ops.Context())
    assert crop({"image": image}, np.random.default_rng(1))["image"].shape == (16, 16, 3)
    (inception,) = ops.parse("inception_crop(24)", ops.Context())
    assert inception({"image": image}, np.random.default_rng(1))["image"].shape == (24, 24, 3)
    for bad, culprit in [("random_crop(ratio=(2, 1))", "ratio"),
                         ("random_crop(1.5)", "scale"),
                         ("random_crop(colour=1)", "random_crop"),
                         ("normalize('gpu')", "gpu")]:
        with pytest.raises(ValueError, match=culprit):
            ops.parse(bad, ops.Context())
    with pytest.raises(ValueError, match=r"cannot read image <bytes>"):
        image_lib.read_encoded(b"not an image at all")
    with pytest.raises(FileNotFoundError, match=r"nothing\.jpg"):
        image_lib.read_encoded("nothing.jpg", str(tmp_path))


def test_normalize_on_device_equals_host(tmp_path):
    """uint8 batches scaled inside jit (the image modality's ``to_model``) equal the
    host-normalised float32 batches to 1e-6."""
    root = make_dataset(tmp_path / "data", {"train": 16, "val": 10, "test": 4}, image_size=40)
    jitted = jax.jit(image_modality.to_model)
    device_cfg = _config(root, pp_eval="decode|resize|normalize|tokenize", cache=False)
    host_cfg = _config(root, pp_eval="decode|resize|normalize('host')|tokenize", cache=False)
    device = next(iter(pipeline.eval_batches(device_cfg, "val", batch_size=8)))
    host = next(iter(pipeline.eval_batches(host_cfg, "val", batch_size=8)))
    assert device["image"].dtype == np.uint8 and host["image"].dtype == np.float32
    np.testing.assert_allclose(np.asarray(jitted(device["image"])), host["image"], atol=1e-6,
                               rtol=0)
    train = {}
    for name, spec in [("device", "decode|random_crop|flip|normalize|tokenize"),
                       ("host", "decode|random_crop|flip|normalize('host')|tokenize"),
                       ("none", "decode|random_crop|flip|tokenize")]:
        cfg = _config(root, pp_train=spec, cache=False)
        tok = pipeline.build_tokenizer(cfg)
        train[name] = next(pipeline.train_iterator(cfg, batch_size=8, seed=3, tokenizer=tok))
    assert train["device"]["image"].dtype == np.uint8
    np.testing.assert_allclose(np.asarray(jitted(train["device"]["image"])),
                               train["host"]["image"], atol=1e-6, rtol=0)
    # Without normalize the pixels stay uint8 too: the model scales whatever uint8 it gets.
    assert train["none"]["image"].dtype == np.uint8
    np.testing.assert_array_equal(train["none"]["image"], train["device"]["image"])
    assert records.DEFAULT_PP_TRAIN.startswith("decode|random_crop|")


def test_eval_step_scales_uint8_images_like_the_host(tmp_path):
    """The compiled eval step on uint8 batches gives the metrics of host-scaled batches."""
    root = make_dataset(tmp_path / "data", {"train": 16, "val": 12, "test": 4}, image_size=32)
    config = folder_config.get_config("tiny")
    config.data.path = str(root)
    s = loop.setup(config, tmp_path / "run")
    state, _ = loop.initial_state(s)
    noise = iter(np.random.default_rng(0).normal(0, 0.05, 10**6).astype(np.float32))
    state = state.replace(params=jax.tree.map(  # random weights: outputs depend on the pixels
        lambda x: np.asarray(x) + np.fromiter(noise, np.float32, x.size).reshape(x.shape),
        state.params))
    state = s.par.put_state(state)
    eval_fn = loop.compile_eval(s)

    def host_scaled(batch: dict) -> dict:
        assert batch["image"].dtype == np.uint8
        return {**batch, "image": batch["image"].astype(np.float32) * (1.0 / 127.5) - 1.0}

    on_device = loop.split_metrics(s, eval_fn, state, "val")
    on_host = loop.split_metrics(s, eval_fn, state, "val", batch_fn=host_scaled)
    assert set(on_device) == set(on_host)
    for k, v in on_host.items():
        np.testing.assert_allclose(on_device[k], v, atol=1e-5, rtol=1e-5, err_msg=k)
    unscaled = loop.split_metrics(s, eval_fn, state, "val", batch_fn=lambda b: {
        **b, "image": b["image"].astype(np.float32)})  # what a step that forgot would see
    assert abs(unscaled["loss"] - on_host["loss"]) > 1e-4


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_other_jpegs_decode_like_pillow(photos, mode):
    """CMYK JPEGs go through Pillow (its DCT scaling via ``draft``), greyscale through
    simplejpeg; both give RGB close to Pillow's own decode, crop and resize."""
    with Image.open(photos[0]) as im:
        src = im.convert(mode)
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90)
    encoded = image_lib.read_encoded(buf.getvalue())
    assert encoded.jpeg == (mode == "L")
    box = (20, 30, 300, 400)
    for size in (224, 64):
        got = image_lib.crop_resize(encoded, box, size).astype(np.float64)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            rgb = im.convert("RGB")
        k = image_lib.dct_scale(box, size) if size == 64 and mode == "L" else 1
        top, left, h, w = (x * k for x in image_lib.scaled_box(box, k, 375, 500))
        want = np.asarray(rgb.resize((size, size), Image.BILINEAR,
                                     box=(left, top, left + w, top + h)), np.float64)
        assert got.shape == (size, size, 3)
        assert np.abs(got - want).mean() < 4.0, (mode, size, np.abs(got - want).mean())
