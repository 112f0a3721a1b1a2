"""Preprocessing: the op registry (``ops``) and the ops and decoders of each modality
(``image``, ``image_io``, ``text``, ``audio``, ``audio_features``, ``series``, ``video``).
Importing the package registers every op, so a spec string can name any of them."""

from mmjax.pp import audio, image, series, text, video

__all__ = ["audio", "image", "series", "text", "video"]
