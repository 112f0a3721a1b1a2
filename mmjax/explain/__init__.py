"""Explanations of a trained model: attention relevance (Chefer et al. 2021), rollout,
integrated gradients, occlusion, modality contributions and layer views (docs/explain.md)."""

from mmjax.explain.gradients import integrated_gradients
from mmjax.explain.run import explain

__all__ = ["explain", "integrated_gradients"]
