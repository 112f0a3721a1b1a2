"""Convert between Hugging Face folders and mmjax checkpoints, and verify they agree.

    python -m mmjax.convert --input HF_DIR --output WORKDIR          # HF → Orbax (init_from)
    python -m mmjax.convert --input WORKDIR --output HF_DIR          # mmjax → HF folder
    python -m mmjax.convert --input HF_DIR --verify                  # per-layer diff table

A training workdir whose tower started from Hugging Face exports with ``--like HF_DIR`` (the
architecture) and ``--modality`` (which tower). ``--verify`` runs transformers and mmjax on
fresh random inputs and prints max |difference| per layer and per output.

A checkpoint is written under the output workdir's lock (a training run in it stops this, and
the other way round); a Hugging Face folder is never written inside a training workdir.
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("input", None, "a Hugging Face folder or an mmjax checkpoint/workdir")
flags.DEFINE_string("output", "", "where to write the other format (empty: write nothing)")
flags.DEFINE_bool("verify", False, "print a per-layer table of max abs differences vs transformers")
flags.DEFINE_string("like", "", "HF folder giving the architecture of a training checkpoint")
flags.DEFINE_string("modality", "", "tower of a training checkpoint to export (e.g. text)")
flags.DEFINE_integer("seed", 0, "seed of the random verification inputs")
FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.input:
        raise ValueError("--input is required")
    if not FLAGS.output and not FLAGS.verify:
        raise ValueError("nothing to do: give --output and/or --verify")
    from mmjax.hf.convert import convert  # after flag parsing: keeps --help fast
    from mmjax.hf.io import is_hf_folder
    from mmjax.trainer import workdir

    writes_checkpoint = bool(FLAGS.output) and is_hf_folder(FLAGS.input)
    if FLAGS.output and not writes_checkpoint:  # a Hugging Face folder: never into a workdir
        workdir.refuse_output_inside(FLAGS.output)
    # A checkpoint goes into a workdir: under its lock, as training writes one.
    with workdir.lock(FLAGS.output, enabled=writes_checkpoint):
        convert(FLAGS.input, FLAGS.output, verify=FLAGS.verify, like=FLAGS.like,
                modality=FLAGS.modality, seed=FLAGS.seed)


if __name__ == "__main__":
    cli.run_main(main)
