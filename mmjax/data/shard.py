r"""Write a folder dataset as ArrayRecord shards that training reads like the folder.

    python -m mmjax.data.shard --input DIR --output OUT [--shard_mb 256] [--skip_bad]
    python -m mmjax.train --config configs/folder.py --workdir W --config.data.path=OUT

Every record of ``DIR/{train,val,test}.jsonl`` is validated as training validates it (errors
name the file and line; ``--skip_bad`` drops and counts bad records) and written with the bytes
of its media files, its text and its label (``mmjax/data/shards.py`` describes the format).
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("input", None, "folder dataset: DIR/{train,val,test}.jsonl and its files")
flags.DEFINE_string("output", None, "new (or empty) folder for the shard set")
flags.DEFINE_float("shard_mb", 256.0, "start a new shard file after about this many MB")
flags.DEFINE_bool("skip_bad", False, "drop and count bad records instead of stopping")
flags.DEFINE_bool("allow_outside_paths", False, "read media paths that leave the input folder")
flags.DEFINE_integer("max_image_pixels", 64_000_000, "refuse larger images (header check)")
flags.DEFINE_float("max_audio_seconds", 600.0, "refuse longer clips (header check)")
flags.DEFINE_integer("max_record_bytes", 1 << 20, "refuse longer JSONL lines")
FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.input or not FLAGS.output:
        raise ValueError("--input DIR and --output OUT are required")
    if FLAGS.shard_mb <= 0:
        raise ValueError(f"--shard_mb must be positive, got {FLAGS.shard_mb}")
    from mmjax.data import shards

    data = {"allow_outside_paths": FLAGS.allow_outside_paths,
            "max_image_pixels": FLAGS.max_image_pixels,
            "max_audio_seconds": FLAGS.max_audio_seconds,
            "max_record_bytes": FLAGS.max_record_bytes}
    manifest = shards.write(FLAGS.input, FLAGS.output, shard_mb=FLAGS.shard_mb,
                            skip_bad=FLAGS.skip_bad, data=data)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['records']} records in {len(info['files'])} shards "
              f"({info['skipped']} skipped)")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli.run_main(main)
