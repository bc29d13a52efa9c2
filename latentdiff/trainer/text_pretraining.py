"""Contrastive pretraining of a text encoder trained from scratch (the optional stage before the U-Net).

A text encoder trained only through the diffusion loss learns slowly: at high noise, where the
caption decides the layout, the loss says little about the text, and early on the U-Net cannot
tell the text encoder which words matter. Pretraining it with CLIP's objective (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision", Sec. 2.3 and
Fig. 3) on the same image-caption pairs gives it, before stage 2, embeddings that already separate
what the images differ in (color, shape, size, position, count); stage 2 then keeps it frozen and
caches its embeddings, so its steps no longer pay for the text encoder at all.

``transformers.CLIPModel`` does the work (its text tower is exactly the ``CLIPTextModel`` of the
pipeline; its loss is the symmetric cross-entropy of the paper): here only the small vision tower is
sized for the training images, and the trained text tower is copied out.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

from ..config import TextTrainConfig


def build_contrastive_model(text_encoder: CLIPTextModel, text_train: TextTrainConfig, image_size: int) -> CLIPModel:
    """A ``CLIPModel`` whose text tower is ``text_encoder``'s (same config, same initial weights) and
    whose vision tower is a small ViT over ``image_size`` images.

    Raises:
        ValueError: ``image_size`` is not a multiple of the patch size, or the widths do not split into heads.
    """
    patch = text_train.image_encoder_patch_size
    if image_size % patch:
        raise ValueError(
            f"text_train.image_encoder_patch_size={patch} must divide data.resolution={image_size}"
        )
    width = text_train.image_encoder_width
    heads = max(1, width // 32)
    if width % heads:
        raise ValueError(f"text_train.image_encoder_width={width} must be a multiple of 32")
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=text_train.image_encoder_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        hidden_act=text_encoder.config.hidden_act,
    )
    config = CLIPConfig(
        text_config=text_encoder.config.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=text_train.projection_dim,
    )
    model = CLIPModel(config)
    model.text_model.load_state_dict(_transformer(text_encoder).state_dict())
    return model


def _transformer(text_encoder: CLIPTextModel):
    """The module whose weights ``CLIPModel.text_model`` holds: ``text_encoder.text_model`` in
    transformers 4, the model itself in transformers 5 (where ``CLIPTextModel`` is flat)."""
    return getattr(text_encoder, "text_model", text_encoder)


def text_encoder_of(model: CLIPModel) -> CLIPTextModel:
    """The trained text tower as the pipeline's ``CLIPTextModel`` (the projection heads stay behind)."""
    text_encoder = CLIPTextModel(model.config.text_config)
    _transformer(text_encoder).load_state_dict(model.text_model.state_dict())
    return text_encoder


@torch.no_grad()
def retrieval_accuracy(logits_per_text: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Share of captions whose best-matching image in the batch is their own image or another one with
    exactly the same caption (short captions such as "a circle" fit several images)."""
    best = logits_per_text.argmax(dim=1).tolist()
    hits = [captions[i] == captions[j] for i, j in enumerate(best)]
    return torch.tensor(sum(hits) / len(hits), device=logits_per_text.device)
