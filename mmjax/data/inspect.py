r"""See the data a config trains on, and measure how fast the pipeline delivers it.

    python -m mmjax.data.inspect --config configs/folder.py --config.data.path=DIR \
        [--split train] [--num 16] [--out grid.png]
    python -m mmjax.data.inspect --config configs/folder.py --config.data.path=DIR \
        --config.data.image_size=224 --benchmark 20

The first prints a few examples (every modality: text decoded back from the token ids, other
inputs by shape and range; the label by name) and writes a PNG grid of the images with their
texts and labels, exactly as the model
receives them after preprocessing: a bug in the data shows up here before it costs a run.
``--benchmark N`` instead times N train batches and reports images/s, split into start-up
(loading, validating and caching the split) and steady state. When the data has audio it also
times the audio front end on the same clips, mmjax's against transformers' feature extractor
(``ASTFeatureExtractor`` / ``WhisperFeatureExtractor``), side by side: clips/s of features.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from mmjax import files, modalities
from mmjax.runtime import cli

flags.DEFINE_string("split", "train", "train (with augmentation), val or test")
flags.DEFINE_integer("num", 16, "how many examples to show")
flags.DEFINE_string("out", "data_grid.png", "where to write the PNG grid")
flags.DEFINE_integer("benchmark", 0, "if > 0: time this many train batches instead")
flags.DEFINE_string("workdir", "", "optional workdir whose saved tokenizer and labels to use "
                    "(only read)")
cli.define_config_flag()
FLAGS = flags.FLAGS


def _saved(workdir: str, name: str) -> str:
    """``workdir`` if it holds the file ``name``, else "": the data layer saves a missing
    tokenizer or label vocabulary into the workdir it is given, and inspecting a workdir must
    never write into it (only training does, under its lock)."""
    return workdir if workdir and (Path(workdir) / name).is_file() else ""


def _batch(config: Any, split: str, num: int, workdir: str) -> tuple[dict, Any]:
    from mmjax.data import pipeline
    from mmjax.data.records import TOKENIZER_FILE

    tok = pipeline.build_tokenizer(config.data, workdir=_saved(workdir, TOKENIZER_FILE))
    if split == "train":
        it = pipeline.train_iterator(config.data, batch_size=num, seed=config.seed, tokenizer=tok)
        return next(it), tok
    batches = pipeline.eval_batches(config.data, split, batch_size=num, tokenizer=tok)
    return next(iter(batches)), tok


def grid(images: np.ndarray, captions: list[str], *, cell: int = 160) -> Any:
    """A PIL image: one tile per example, the picture above its caption."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = min(n, 4)
    rows = -(-n // cols)
    text_h = 48
    canvas = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, caption) in enumerate(zip(images, captions, strict=True)):
        pixels = np.asarray(im)  # uint8 as the workers send it, or float32 in [-1, 1]
        if pixels.dtype != np.uint8:
            pixels = np.clip((pixels.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
        tile = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        canvas.paste(tile, (x, y))
        for j, line in enumerate(textwrap.wrap(caption, width=cell // 6)[:4]):
            draw.text((x + 2, y + cell + 1 + 11 * j), line, fill="black")
    return canvas


def _describe(name: str, x: Any, tokenizer: Any) -> str:
    """One example's entry: decoded text for token ids, else shape, dtype and range."""
    if isinstance(x, dict) and "ids" in x:
        return f"{name} {tokenizer.decode(np.asarray(x['ids'])[None])[0]!r}"
    leaves = x.items() if isinstance(x, dict) else [("", x)]
    return "  ".join(f"{name}{'.' + k if k else ''} {tuple(v.shape)} {v.dtype} range "
                     f"[{v.min():.2f}, {v.max():.2f}]" for k, v in leaves)


def show(config: Any, split: str, num: int, out: str, workdir: str = "") -> list[str]:
    """Prints ``num`` examples of ``split`` (every modality, the label, what is absent) and
    writes a grid of their images, if they have any, to ``out``; returns the lines."""
    from mmjax.data import pipeline
    from mmjax.data.folder import LABELS_FILE

    files.refuse_output_inside(out, "--out")  # only training writes into a training workdir
    # first: the batches' class indices then follow the workdir's saved classes
    names = pipeline.label_names(config.data, workdir=_saved(workdir, LABELS_FILE))
    batch, tok = _batch(config, split, num, workdir)
    inputs = [m for m in modalities.names() if m in batch]
    lines = []
    for i in range(num):
        row = [_describe(m, jax.tree.map(lambda v, i=i: np.asarray(v)[i], batch[m]), tok)
               for m in inputs]
        absent = [m for m, v in batch.get("present", {}).items() if not v[i]]
        lines.append(f"[{i}] " + "  ".join(row) + f"  label {names[int(batch['label'][i])]!r}"
                     + (f"  absent {absent}" if absent else ""))
        print(lines[-1])
    if "image" in batch:
        texts = tok.decode(batch["text"]["ids"]) if "text" in batch else [""] * num
        captions = [f"{t} -> {names[int(y)]}" for t, y in zip(texts, batch["label"], strict=True)]
        grid(batch["image"][:num], captions[:num]).save(out)
        print(f"wrote {Path(out).absolute()}")
    return lines


def benchmark(config: Any, steps: int) -> dict[str, float]:
    """images/s of the train pipeline: start-up (load, validate, cache) and steady state."""
    from mmjax.data import pipeline

    bs = config.batch_size
    t0 = time.perf_counter()
    tok = pipeline.build_tokenizer(config.data)
    pipeline.dataset_info(config.data, tok)
    it = pipeline.train_iterator(config.data, batch_size=bs, seed=config.seed, tokenizer=tok)
    next(it)
    t1 = time.perf_counter()
    for _ in range(steps):
        next(it)
    t2 = time.perf_counter()
    result = {
        "startup_s": t1 - t0,
        "images_per_s": steps * bs / (t2 - t1),
        "image_size": float(config.data.image_size),
        "batch_size": float(bs),
    }
    print(
        f"pipeline: {result['images_per_s']:.0f} images/s at {config.data.image_size} px "
        f"(batch {bs}, {steps} batches, pp_train {config.data.get('pp_train', 'shapes')!r}); "
        f"start-up {result['startup_s']:.1f} s"
    )
    if "audio" in pipeline.modalities(config.data):
        result.update(audio_benchmark(config.data, min(steps * bs, 256)))
    return result


def _hf_extractor(fe: Any) -> Any:
    """transformers' feature extractor with the options of mmjax front end ``fe``."""
    import transformers

    o = fe.options
    if fe.kind == "ast":
        return transformers.ASTFeatureExtractor(
            sampling_rate=fe.sampling_rate, num_mel_bins=o["num_mel_bins"],
            max_length=o["max_length"], mean=o["mean"], std=o["std"],
            do_normalize=o["do_normalize"])
    hf = transformers.WhisperFeatureExtractor(
        feature_size=o["num_mel_bins"], sampling_rate=fe.sampling_rate, n_fft=o["n_fft"],
        hop_length=o["hop_length"], chunk_length=-(-o["n_samples"] // fe.sampling_rate),
        padding_value=o["padding_value"])
    hf.n_samples = o["n_samples"]  # chunk_length counts whole seconds; clips here may be shorter
    hf.nb_max_frames = o["n_samples"] // o["hop_length"]
    return hf


def audio_benchmark(data_config: Any, num: int) -> dict[str, float]:
    """clips/s of decoding (file → mono at the front end's rate) and of features, mmjax's
    front end and transformers' extractor on the same ``num`` train clips, one clip per call
    as the pipeline makes them; prints one ``audio:`` line."""
    from mmjax.data import records
    from mmjax.pp import audio as audio_pp

    data = records.split_data(data_config, "train", labelled=False)
    fe = data.ctx.audio
    paths = [r["audio"] for r in data.source.records if "audio" in r][:num]
    features = audio_pp.audio_features_op(fe)
    t0 = time.perf_counter()
    clips = [audio_pp.decode_audio(p, fe.sampling_rate) for p in paths]
    t1 = time.perf_counter()
    ours = [features(c) for c in clips]
    t2 = time.perf_counter()
    hf = _hf_extractor(fe)
    key = "input_values" if fe.kind == "ast" else "input_features"
    theirs = [hf(c, sampling_rate=fe.sampling_rate, return_tensors="np")[key][0] for c in clips]
    t3 = time.perf_counter()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
    n = len(clips)
    out = {"audio_clips": float(n), "decode_clips_per_s": n / (t1 - t0),
           "mmjax_clips_per_s": n / (t2 - t1), "hf_clips_per_s": n / (t3 - t2),
           "max_abs_diff": diff}
    print(f"audio: {fe.kind} features {tuple(ours[0].shape)} of {n} clips: mmjax "
          f"{out['mmjax_clips_per_s']:.0f} clips/s, transformers {type(hf).__name__} "
          f"{out['hf_clips_per_s']:.0f} clips/s (max |diff| {diff:.1e}); decode+resample "
          f"{out['decode_clips_per_s']:.0f} clips/s; "
          + ("the pipeline computes each clip's features once, at start-up (data.cache)"
             if data.cache["audio"] else "the pipeline decodes and computes features every batch"))
    return out


def main() -> None:
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/folder.py)")
    if FLAGS.benchmark > 0:
        benchmark(FLAGS.config, FLAGS.benchmark)
    else:
        show(FLAGS.config, FLAGS.split, FLAGS.num, FLAGS.out, FLAGS.workdir)


if __name__ == "__main__":
    cli.run_main(main)
