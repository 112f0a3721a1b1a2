"""Explanations of a trained model: attention relevance (Chefer et al. 2021), rollout,
integrated gradients, occlusion, modality contributions and layer views (docs/explain.md).
``explain.explain`` is what ``python -m mmjax.explain`` runs."""
