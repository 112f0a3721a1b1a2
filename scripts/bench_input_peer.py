r"""mmjax's input pipeline against the PyTorch DataLoader a user would write, side by side.

    PYTHONPATH=. python scripts/bench_input_peer.py [--dir DIR] [--workers 1,2,all] \
        [--batches 30] [--repeats 3] [--out results.json]
    PYTHONPATH=. python scripts/bench_input_peer.py --dir DIR --micro

Same JPEG files, same work: decode, a random crop of 60-100 % of the area with aspect ratio in
[3/4, 4/3] resized to 224 (bilinear), horizontal flip with p = 0.5, normalise to [-1, 1],
batches of 64 from N worker processes. Without ``--dir`` it writes ~2,000 photo JPEGs (500x375,
quality 90: random crops and scales of scikit-learn's two sample photos) into a temporary
folder in the folder-dataset layout. Each measurement runs in its own process, the two
pipelines alternating, and times ``--batches`` batches after the first (steady state).
``--micro`` instead times the decoders and resizers one crop could use, in one process, and
how far each path's pixels are from a Lanczos resize (the choices in mmjax.data.image).

The peer: ``torch.utils.data.DataLoader`` over a Dataset doing ``PIL.Image.open(f).convert
("RGB")``, then torchvision's ``RandomResizedCrop(224, scale=(0.6, 1))`` / flip / ``ToTensor`` /
``Normalize(0.5, 0.5)``. torchvision is not installable here (its CPU wheel for torch 2.13 is
not on this machine's index and the CUDA one does not load on the CPU torch), so the transforms
are written out below exactly as torchvision 0.2x runs them on PIL images (``get_params`` with
torch's RNG, ``img.crop(box).resize(size, BILINEAR)``, ``ToTensor``, ``Normalize``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE, BATCH, MIN_SCALE = 224, 64, 0.6
PP_TRAIN = "decode|random_crop|flip|normalize|tokenize"


def make_jpegs(root: Path, n: int = 2000, seed: int = 0) -> Path:
    """``n`` train photos (+ small val/test) of 500x375 at quality 90, as a folder dataset."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427x640
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    sizes = {"train": n, "val": 16, "test": 16}
    k = 0
    for split, count in sizes.items():
        lines = []
        for _ in range(count):
            which = int(rng.integers(2))
            src = photos[which]
            h, w = src.shape[:2]
            ch = int(h * rng.uniform(0.45, 1.0))
            cw = min(w, int(ch * 4 / 3 * rng.uniform(0.9, 1.1)))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            im = Image.fromarray(src[top : top + ch, left : left + cw]).resize((500, 375),
                                                                              Image.BICUBIC)
            name = f"img/{k:05d}.jpg"
            im.save(root / name, quality=90)
            k += 1
            label = ("temple", "flower")[which]
            lines.append(json.dumps({"image": name, "text": f"a photo of a {label}",
                                     "label": label}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --- the PyTorch peer -----------------------------------------------------------------------


def _torch_loader(root: Path, workers: int):
    import torch
    from PIL import Image

    files = [root / json.loads(x)["image"]
             for x in (root / "train.jsonl").read_text().splitlines()]
    mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))

    def get_params(width: int, height: int) -> tuple[int, int, int, int]:
        # torchvision.transforms.RandomResizedCrop.get_params
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(MIN_SCALE, 1.0).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = width / height  # fallback: the central crop, clipped to the ratio range
        if in_ratio < 3 / 4:
            w, h = width, round(width / (3 / 4))
        elif in_ratio > 4 / 3:
            h, w = height, round(height * (4 / 3))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    class Photos(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, index: int):
            with open(files[index], "rb") as f:
                img = Image.open(f).convert("RGB")
            i, j, h, w = get_params(*img.size)
            img = img.crop((j, i, j + w, i + h)).resize((SIZE, SIZE), Image.BILINEAR)
            if torch.rand(1) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            # ToTensor, then Normalize
            x = torch.from_numpy(np.array(img, np.uint8, copy=True))
            x = x.view(SIZE, SIZE, 3).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
            return (x - mean) / std, 0

    return torch.utils.data.DataLoader(Photos(), batch_size=BATCH, shuffle=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       drop_last=True)


def _run_torch(root: Path, workers: int, batches: int) -> float:
    import torch

    torch.set_num_threads(1)
    it = iter(_torch_loader(root, workers))
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    assert x.shape == (BATCH, 3, SIZE, SIZE) and x.dtype == torch.float32
    return batches * BATCH / (time.perf_counter() - t)


# --- mmjax ----------------------------------------------------------------------------------


def _run_mmjax(root: Path, workers: int, batches: int) -> float:
    from mmjax import config as config_lib
    from mmjax.data import inspect as data_inspect

    folder_config = config_lib.load_file(Path(__file__).resolve().parents[1] / "configs/folder.py")

    config = folder_config.get_config()
    config.unlock()
    config.data.path = str(root)
    config.data.image_size = SIZE
    config.data.cache = False
    config.data.num_workers = workers
    config.data.pp_train = PP_TRAIN
    config.batch_size = BATCH
    return data_inspect.benchmark(config, batches)["images_per_s"]


# --- the choices inside one crop ------------------------------------------------------------


def micro(root: Path, n: int = 60, sizes: tuple[int, ...] = (224, 96, 64)) -> None:
    """Per-image ms of decoders and resizers (one process, best of 3) and each path's mean
    |difference| from a Lanczos resize of the full decode (grey levels, the same crop)."""
    import cv2
    import simplejpeg
    from PIL import Image

    from mmjax.pp import image_io as image_lib

    files = sorted((root / "img").glob("*.jpg"))[:n]
    data = [f.read_bytes() for f in files]

    def best_ms(fn) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for i in range(len(data)):
                fn(i)
            best = min(best, (time.perf_counter() - t) / len(data) * 1e3)
        return best

    decoders = {
        "Pillow open+convert RGB": lambda i: Image.open(io.BytesIO(data[i])).convert("RGB"),
        "simplejpeg": lambda i: simplejpeg.decode_jpeg(data[i]),
        "OpenCV imdecode": lambda i: cv2.imdecode(np.frombuffer(data[i], np.uint8),
                                                  cv2.IMREAD_COLOR_RGB),
    }
    for name, fn in decoders.items():
        print(f"decode {name}: {best_ms(fn):.2f} ms")
    full = [simplejpeg.decode_jpeg(d) for d in data]
    rng = np.random.default_rng(0)
    boxes = [image_lib.inception_box(rng, *f.shape[:2], (MIN_SCALE, 1.0)) for f in full]

    def pil_box(i: int, size: int, f=Image.BILINEAR) -> np.ndarray:
        t, left, h, w = boxes[i]
        return np.asarray(Image.fromarray(full[i]).resize((size, size), f,
                                                          box=(left, t, left + w, t + h)))

    def cv(i: int, size: int, interpolation: int) -> np.ndarray:
        t, left, h, w = boxes[i]
        return cv2.resize(full[i][t : t + h, left : left + w], (size, size),
                          interpolation=interpolation)

    resizers = {"Pillow bilinear resize(box)": pil_box,
                "OpenCV INTER_LINEAR": lambda i, s: cv(i, s, cv2.INTER_LINEAR),
                "OpenCV INTER_AREA": lambda i, s: cv(i, s, cv2.INTER_AREA)}
    for name, fn in resizers.items():
        print(f"resize to {SIZE} {name}: {best_ms(lambda i, fn=fn: fn(i, SIZE)):.2f} ms")
    for size in sizes:
        errors: dict[str, list[float]] = {"Pillow bilinear": [], "mmjax crop_resize": [],
                                          "simplejpeg at k/8 >= size, Pillow bilinear": []}
        for i, d in enumerate(data):
            k = image_lib.dct_scale(boxes[i], size)
            H, W = full[i].shape[:2]
            t, left, h, w = (x * k for x in image_lib.scaled_box(boxes[i], k, H, W))
            edges = (left, t, min(left + w, W), min(t + h, H))
            ref = np.asarray(Image.fromarray(full[i]).resize((size, size), Image.LANCZOS,
                                                             box=edges), np.float64)
            bil = np.asarray(Image.fromarray(full[i]).resize((size, size), Image.BILINEAR,
                                                             box=edges))
            ours = image_lib.crop_resize(image_lib.read_encoded(d), boxes[i], size)
            t0, l0, h0, w0 = boxes[i]  # libjpeg-turbo's smallest k/8 scale keeping >= size
            px = simplejpeg.decode_jpeg(d, min_height=math.ceil(H * size / h0),
                                        min_width=math.ceil(W * size / w0))
            fy, fx = px.shape[0] / H, px.shape[1] / W
            m8 = np.asarray(Image.fromarray(px).resize((size, size), Image.BILINEAR, box=(
                l0 * fx, t0 * fy, (l0 + w0) * fx, (t0 + h0) * fy)))
            ref0 = np.asarray(Image.fromarray(full[i]).resize((size, size), Image.LANCZOS, box=(
                l0, t0, l0 + w0, t0 + h0)), np.float64)
            errors["Pillow bilinear"].append(np.abs(bil - ref).mean())
            errors["mmjax crop_resize"].append(np.abs(ours - ref).mean())
            errors["simplejpeg at k/8 >= size, Pillow bilinear"].append(np.abs(m8 - ref0).mean())
        print(f"{size} px, mean |x - Lanczos|: " + ", ".join(
            f"{k} {np.mean(v):.2f}" for k, v in errors.items()))


# --- side by side ---------------------------------------------------------------------------


def _one(kind: str, root: Path, workers: int, batches: int) -> float:
    """Runs one measurement in a fresh process (no state shared between the pipelines)."""
    cmd = [sys.executable, __file__, "--dir", str(root), "--one", kind,
           "--workers", str(workers), "--batches", str(batches)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1].split()[-1])


def compare(root: Path, workers: list[int], batches: int, repeats: int) -> list[dict]:
    rows = []
    for w in workers:
        got: dict[str, list[float]] = {"torch": [], "mmjax": []}
        for _ in range(repeats):
            for kind in ("torch", "mmjax"):
                got[kind].append(_one(kind, root, w, batches))
        cores = min(w, os.cpu_count() or 1)
        row = {"workers": w, "cores": cores,
               **{f"{k}_images_per_s": statistics.median(v) for k, v in got.items()},
               **{f"{k}_all": [round(x, 1) for x in v] for k, v in got.items()}}
        row["speedup"] = row["mmjax_images_per_s"] / row["torch_images_per_s"]
        rows.append(row)
        print(f"{w} workers: torch {row['torch_images_per_s']:.0f} images/s "
              f"({row['torch_images_per_s'] / cores:.0f}/core), mmjax "
              f"{row['mmjax_images_per_s']:.0f} images/s ({row['mmjax_images_per_s'] / cores:.0f}"
              f"/core), {row['speedup']:.2f}x  runs: torch {got['torch']} mmjax {got['mmjax']}",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="", help="folder dataset (default: generate photo JPEGs)")
    p.add_argument("--num", type=int, default=2000, help="train JPEGs to generate")
    p.add_argument("--workers", default="1,2,all", help="worker counts; 'all' = cpu count")
    p.add_argument("--batches", type=int, default=30, help="timed batches after the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--micro", action="store_true",
                   help="instead: time decoders/resizers and their distance from Lanczos")
    p.add_argument("--one", choices=("torch", "mmjax"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run = _run_torch if args.one == "torch" else _run_mmjax
        print(f"images/s {run(Path(args.dir), int(args.workers), args.batches):.1f}")
        return
    root = Path(args.dir) if args.dir else make_jpegs(
        Path(tempfile.mkdtemp(prefix="mmjax_photos_")), args.num)
    if args.micro:
        micro(root)
        return
    counts = sorted({(os.cpu_count() or 1) if w == "all" else int(w)
                     for w in args.workers.split(",")})
    print(f"{root}: {sum(1 for _ in (root / 'img').iterdir())} JPEGs; {os.cpu_count()} cores; "
          f"batch {BATCH}, {args.batches} timed batches, median of {args.repeats}", flush=True)
    rows = compare(root, counts, args.batches, args.repeats)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
