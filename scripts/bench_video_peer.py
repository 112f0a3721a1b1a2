r"""mmjax's video input pipeline against the PyTorch DataLoader a user would write with PyAV.

    PYTHONPATH=. python scripts/bench_video_peer.py [--dir DIR] [--workers 2] [--batches 20] \
        [--repeats 2] [--out results.json]

Same H.264 files, same work: a random window of 8 frames every 2, one random crop of 60-100 %
of the area (aspect ratio in [3/4, 4/3]) resized to 112 px for all frames of a clip, uint8
batches ``[32, 8, 112, 112, 3]`` from N worker processes. Without ``--dir`` it writes 256 clips
of 64 frames at 320x240 (25 fps, a keyframe every 25 frames) into a temporary folder in the
folder-dataset layout. Each measurement runs in its own process, the two pipelines
alternating, and times ``--batches`` batches after the first.

The peer is the loader of PyAV's documentation and of most video repositories: open the file,
decode frames from the start with ``container.decode(video=0)`` up to the window's last frame,
``frame.to_ndarray(format="rgb24")`` for the window's frames, then a
``RandomResizedCrop``-style box cut from each frame and resized with Pillow (bilinear), stacked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FRAMES, STRIDE, SIZE, BATCH = 8, 2, 112, 32
PP_TRAIN = "tokenize|decode_video|video_random_crop(0.6)"


def make_clips(root: Path, n: int = 256, length: int = 64, seed: int = 0) -> Path:
    """``n`` H.264 clips of moving noise blobs and their JSONL records (train/val/test)."""
    import av

    rng = np.random.default_rng(seed)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"clips/{i:04d}.mp4"
        base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        with av.open(str(root / name), "w") as out:
            s = out.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt, s.gop_size = 320, 240, "yuv420p", 25
            for t in range(length):
                frame = np.kron(np.roll(base, t, axis=1), np.ones((4, 4, 1), np.uint8))
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        lines.append(json.dumps({"video": name, "text": "a clip", "label": str(i % 4)}) + "\n")
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("".join(lines))
    return root


# --- the peer: torch DataLoader + PyAV ------------------------------------------------------


def _run_torch(root: Path, workers: int, batches: int) -> float:
    import av
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    files = sorted((root / "clips").glob("*.mp4"))

    class Clips(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, index: int):
            g = torch.Generator().manual_seed(index)
            with av.open(str(files[index])) as c:
                n = c.streams.video[0].frames
                start = int(torch.randint(0, n - (FRAMES - 1) * STRIDE, (1,), generator=g))
                want = set(range(start, start + FRAMES * STRIDE, STRIDE))
                frames = []
                for k, f in enumerate(c.decode(video=0)):
                    if k in want:
                        frames.append(f.to_ndarray(format="rgb24"))
                    if len(frames) == FRAMES:
                        break
            h, w = frames[0].shape[:2]
            area = h * w * float(torch.empty(1).uniform_(0.6, 1.0, generator=g))
            ratio = float(np.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3),
                                                         generator=g)))
            cw, ch = min(w, round((area * ratio) ** 0.5)), min(h, round((area / ratio) ** 0.5))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            box = (left, top, left + cw, top + ch)
            out = np.stack([np.asarray(Image.fromarray(f).resize((SIZE, SIZE),
                                                                 Image.BILINEAR, box=box))
                            for f in frames])
            return torch.from_numpy(out)

    loader = torch.utils.data.DataLoader(Clips(), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    it = iter(_forever(loader))
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        x = next(it)
    assert tuple(x.shape) == (BATCH, FRAMES, SIZE, SIZE, 3)
    return batches * BATCH / (time.perf_counter() - t)


def _forever(loader):
    while True:
        yield from loader


# --- mmjax ----------------------------------------------------------------------------------


def _run_mmjax(root: Path, workers: int, batches: int) -> float:
    from mmjax import config as config_lib
    from mmjax.data import inspect as data_inspect

    folder = config_lib.load_file(Path(__file__).resolve().parents[1] / "configs/folder.py")
    config = folder.get_config()
    config.unlock()
    config.data.path = str(root)
    config.data.video = {"num_frames": FRAMES, "stride": STRIDE, "fps": 0.0, "size": SIZE}
    config.data.num_workers = workers
    config.data.pp_train = PP_TRAIN
    config.batch_size = BATCH
    return data_inspect.benchmark(config, batches)["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one measurement
    a = ap.parse_args()
    if a.one:
        fn = _run_torch if a.one == "torch" else _run_mmjax
        print(json.dumps({"clips_per_s": fn(Path(a.dir), a.workers, a.batches)}))
        return
    root = Path(a.dir) if a.dir else make_clips(Path(tempfile.mkdtemp(prefix="mmjax-video-")))
    results: dict[str, list[float]] = {"torch": [], "mmjax": []}
    for _ in range(a.repeats):
        for name in ("torch", "mmjax"):
            r = subprocess.run([sys.executable, __file__, "--one", name, "--dir", str(root),
                                "--workers", str(a.workers), "--batches", str(a.batches)],
                               capture_output=True, text=True, check=True)
            results[name].append(json.loads(r.stdout.strip().splitlines()[-1])["clips_per_s"])
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"torch DataLoader + PyAV: {med['torch']:.1f} clips/s  mmjax: {med['mmjax']:.1f} "
          f"clips/s  ratio {med['mmjax'] / med['torch']:.2f}x  ({a.workers} workers, runs "
          f"{results})")
    if a.out:
        Path(a.out).write_text(json.dumps({"runs": results, "median": med}))


if __name__ == "__main__":
    main()
