"""Robustness evaluation: input corruptions, adversarial attacks, modality drops, reports.

``corruptions`` (images, text, audio; pure numpy on raw inputs), ``attacks`` (FGSM and PGD on
pixels and token embeddings), ``drop`` (evaluation with modalities marked absent) and
``report`` (table and plots). ``mmjax.inference.evaluate`` wires them into
``python -m mmjax.evaluate``; docs/inference.md has the flags and the output.
"""
