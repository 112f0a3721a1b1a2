"""Hugging Face BERT, ViT, CLIP, ResNet, AST and Whisper (encoder) folders loaded into mmjax's own
encoders, and back.

The towers are the trainer's modules (``TextEncoder``, ``ViT``, ``ResNet``, ``AST``,
``WhisperEncoder``) with the options Hugging Face needs, wrapped only to rename outputs to Hugging
Face's names; there is no parallel copy of an encoder here. Each architecture is one module
(``bert``, ``vit``, ``clip``, ``resnet``, ``ast``, ``whisper``: config → options, wrapper, weight
table) registered in ``registry.ARCHITECTURES``;
``io`` reads and writes folders through that registry and ``compare`` checks the result against
transformers. Local folders only: nothing is downloaded.

    model, variables = mmjax.hf.load("bert-folder")
    out = model.apply(variables, input_ids=ids, attention_mask=mask)  # HF output names
    mmjax.hf.save(model, variables, "back")  # a folder transformers loads as-is
"""

from __future__ import annotations

from mmjax.data.tokenize import HFTokenizer
from mmjax.data.tokenize import load_hf_tokenizer as load_tokenizer
from mmjax.hf import registry
from mmjax.hf.ast import HFAST, ast_audio_options, ast_table
from mmjax.hf.bert import HFBert, bert_table, bert_text_options
from mmjax.hf.clip import HFCLIP, clip_table, clip_text_options, clip_vision_options
from mmjax.hf.common import Architecture, HFError
from mmjax.hf.compare import compare, format_table, random_inputs
from mmjax.hf.convert import convert
from mmjax.hf.io import (
    is_hf_folder,
    load,
    load_feature_extractor,
    read_config,
    read_weights,
    save,
    state_dict,
    variables_from_hf,
)
from mmjax.hf.registry import ARCHITECTURES, MODEL_TYPES, build, image_size, table
from mmjax.hf.resnet import HFResNet, resnet_image_options, resnet_table
from mmjax.hf.table import Entry
from mmjax.hf.vit import HFViT, crop_to_patches, vit_image_options, vit_table
from mmjax.hf.whisper import HFWhisperEncoder, whisper_audio_options, whisper_table

__all__ = [
    "ARCHITECTURES",
    "HFAST",
    "HFCLIP",
    "MODEL_TYPES",
    "Architecture",
    "Entry",
    "HFBert",
    "HFError",
    "HFResNet",
    "HFTokenizer",
    "HFViT",
    "HFWhisperEncoder",
    "ast_audio_options",
    "ast_table",
    "bert_table",
    "bert_text_options",
    "build",
    "clip_table",
    "clip_text_options",
    "clip_vision_options",
    "compare",
    "convert",
    "crop_to_patches",
    "format_table",
    "image_size",
    "is_hf_folder",
    "load",
    "load_feature_extractor",
    "load_tokenizer",
    "random_inputs",
    "read_config",
    "read_weights",
    "registry",
    "resnet_image_options",
    "resnet_table",
    "save",
    "state_dict",
    "table",
    "variables_from_hf",
    "vit_image_options",
    "vit_table",
    "whisper_audio_options",
    "whisper_table",
]
