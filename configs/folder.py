r"""Bring your own data: a folder of images, audio clips and texts, DIR/{train,val,test}.jsonl.

    python -m mmjax.train --config configs/folder.py --workdir /tmp/mmjax_folder \
        --config.data.path=DIR

Each JSONL line is ``{"image": "relative/path.png", "audio": "relative/clip.wav", "text": "...",
"label": "yes"}`` with any non-empty subset of image, audio, text, ``"series": "x.npy"``
(floats [time, channels]) and ``"video": "clip.mp4"`` (any FFmpeg format; docs/video.md); the
model gets a tower for each modality the train records have (the others are removed from
``config.model``), and a record without one of them is marked absent in
``batch["present"]``. Images (any format Pillow reads) are resized to ``data.image_size``; clips
(WAV/FLAC/OGG, any rate, mono or stereo) are averaged to mono, resampled to
``data.audio.sampling_rate`` and turned into Whisper-style log-mel features of ``num_mel_bins``
mels by ``data.audio.max_frames`` frames (10 ms each; longer clips are cut, shorter ones
padded); the text
goes through a word-piece tokenizer trained on the train texts and saved in the workdir (or
``data.tokenizer=HF_FOLDER``); the label vocabulary is built from train and saved in the
workdir. Every record is validated
(and its image decoded and cached at the model's size) before training, so bad data stops the
run at once, naming the file and line; ``--config.data.skip_bad=True`` drops and counts them.
Clips are decoded and their features cached the same way.

The recipe, measured on several kinds of real-data sets at once (digit questions, colour boards,
three modalities, photo captions; docs/recipes.md has the tables): 32-px images in patches of 8
(a 4x4 grid of tokens), an image tower of one transformer layer whose position embeddings start
at the scale of the patch content, an embedding-only text tower, a one-layer Whisper-style audio
tower (tokens of 20 ms), two cross-attention fusion layers (the question attends to the other
modalities' tokens), AdamW at lr 5e-4 for 3,000 steps of 64, no dropout, and neither crops nor
flips (a crop moves content off the patch grid, a flip changes a digit, a letter or "left of";
dropout slows questions about where things are). With ``model.modality_dropout`` > 0 the run
trains on complete inputs alone until ``model.modality_dropout_start`` of its steps, then on each
example's dropped view and its complete input (``model.complete_input_weight``). The ``qa``
evaluator adds the accuracy per question type (the question's first two words).

Arguments: ``tiny`` (few steps, for tests).
"""

from __future__ import annotations

import ml_collections

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("tiny",), "configs/folder.py")

    c = config.run(total_steps=3_000, batch_size=64, eval_batch_size=256, eval_every=1_000,
                   checkpoint_every=1_000)
    c.data = ml_collections.ConfigDict({
        "name": "folder",
        "path": "",  # --config.data.path=DIR: a folder or a shard set (python -m mmjax.data.shard)
        # Several folders or shard sets instead of data.path, sampled by weight, e.g.
        # --config.data.mixture='{"DIR_A": 3, "DIR_B": 1}' (docs/data.md).
        "mixture": "",
        "image_size": 32,  # patch 8: a 4x4 grid of tokens
        "max_len": 16,
        "tokenizer": "",  # "" = word-piece trained on train texts; else an HF tokenizer folder
        "vocab_size": 2000,  # word-piece vocabulary target
        # No flip (mirroring changes digits, letters and left/right answers) and no crop (a
        # crop moves content off the patch grid: questions about where things are, or which
        # of two digits is which colour, stop learning; docs/recipes.md). The audio ops only
        # act on records with audio; no spec_augment by default: its time masks can erase the
        # very events a question counts (add "|spec_augment(2, 8, 0, 0)" for mel masks only).
        # series(length, channels): sensor series padded or cut to 64 steps of 3 channels.
        # Video: a random window of data.video's frames in train, the centre one in eval.
        "pp_train": "decode|resize|normalize|tokenize|decode_audio|audio_features|series(64, 3)"
                    "|decode_video|video_resize",
        "pp_eval": "decode|resize|normalize|tokenize|decode_audio|audio_features|series(64, 3)"
                   "|decode_video(window='center')|video_resize",
        # The audio front end: "whisper" (log10 mel, [mels, frames]) or "ast" (Kaldi fbank,
        # [frames, mels]); "preprocessor": an HF folder whose preprocessor_config.json replaces
        # these.
        "audio": {"front_end": "whisper", "preprocessor": "", "sampling_rate": 16000,
                  "num_mel_bins": 64, "max_frames": 128},
        # Clips ("video": "x.mp4", any FFmpeg format): num_frames taken every stride frames
        # (or at fps > 0 frames per second), each resized to size x size (mmjax.pp.video).
        # Evaluation and predict average the class probabilities over num_clips windows x
        # num_crops square crops per clip (1 x 1: the centre window, whole frames).
        "video": {"num_frames": 8, "stride": 2, "fps": 0.0, "size": 32, "num_clips": 1,
                  "num_crops": 1},
        "skip_bad": False,
        # Records are data, not trusted (docs/security.md): paths leaving DIR are refused, and
        # so are files whose header promises more than these limits, before decoding.
        "allow_outside_paths": False,
        "max_image_pixels": 64_000_000,
        "max_audio_seconds": 600.0,
        "max_record_bytes": 1 << 20,  # one JSONL line
        # data.tokenizer may map at most this fraction of the train words to its unknown token.
        "max_unk_rate": 0.05,
        "cache": True,  # keep decoded, resized pixels in memory (bounded by cache_mb)
        "cache_mb": 2048,
        "num_workers": 0,  # >0: decode/augment in grain worker processes
    })
    model = config.shapes_model()
    # One self-attention layer lets image tokens combine what neighbouring patches show (a
    # digit spans several); positions at the content's scale make every token know its place
    # from the first step (at ViT's 0.02 such questions stay near chance).
    towers = model["encoders"]
    towers["image"].update({"depth": 1, "pos_embedding_std": 1.0})
    # A Whisper-style tower: a conv1d stem (kernel 3, stride 2) turns the [64 mels, 128 frames]
    # log-mel into 64 tokens of 20 ms, then one transformer layer, width 64. Tokens this short
    # see an event's onset inside their kernel, so counting and timing questions learn; a ViT
    # over 16x16 spectrogram patches (AST) counted worse (docs/recipes.md). Removed when the
    # train records have no audio.
    towers["audio"] = {
        "kind": "whisper", "variant": "mu", "width": 64, "depth": 1, "num_heads": 4,
        "mlp_dim": 256, "max_len": 1500, "pool": "mean",
        "init_from": "",  # an HF whisper folder (its front end must match data.audio)
    }
    # Time series ("series": "x.npy", [time, channels]): a 1-D patch transformer over the 64
    # steps of data.pp_*'s series op, patches of 8 (8 tokens). Removed when there are none.
    towers["series"] = {"kind": "series", "width": 64, "depth": 1, "num_heads": 4,
                        "mlp_dim": 256, "patch_size": 8, "max_patches": 8}
    # Video: a ViViT of tubelets of 2 frames x 8x8 pixels (4 x 16 tokens for 8 frames of 32 px)
    # under one joint space-time attention layer (stem: 3x3 stride-2 convolutions per frame
    # before it, docs/video.md). Removed when there are no clips.
    towers["video"] = {"kind": "vivit", "variant": "mu/8", "width": 64, "depth": 1,
                       "num_heads": 4, "mlp_dim": 256, "tubelet": 2, "attention": "joint",
                       "stem": 0, "pos_embedding_std": 1.0, "pool": "gap", "init_from": ""}
    c.model = ml_collections.ConfigDict({
        **model,
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},  # 0: from data
        # No dropout: at 0.1 questions about which of two digits has which colour learn far
        # slower (docs/recipes.md); one-digit questions lose a point or two without it.
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})
    c.evals = ml_collections.ConfigDict({"qa": {"kind": "qa", "task": "answer"}})
    c.optimizer = config.optimizer(lr=5e-4)  # 2e-3 (the shapes setting) stays near chance on digits

    if "tiny" in args:
        config.tiny(c, total_steps=12, batch_size=8, eval_batch_size=16, every=6)
    c.lock()
    return c
