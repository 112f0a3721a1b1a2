"""Robustness evaluation: input corruptions, adversarial attacks, modality drops, reports.

``corruptions`` (each modality's, declared in ``mmjax.modalities``; pure numpy on raw inputs),
``attacks`` (FGSM and PGD where a modality declares an attack: pixels, token embeddings),
``drop`` (evaluation with modalities marked absent) and ``report`` (table and plots).
``mmjax.inference.checkpoint_metrics`` wires them into ``python -m mmjax.evaluate``;
docs/inference.md has the flags and the output.
"""
