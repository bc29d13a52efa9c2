"""Contrastive pretraining of a text encoder trained from scratch (the optional stage before the U-Net).

A text encoder trained only through the diffusion loss learns slowly: at high noise, where the
caption decides the layout, the loss says little about the text, and early on the U-Net cannot
tell the text encoder which words matter. Pretraining it with CLIP's objective (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision", Sec. 2.3 and
Fig. 3) on the same image-caption pairs gives it, before stage 2, embeddings that already separate
what the images differ in (color, shape, size, position, count). Stage 2 starts from it and trains it
further (``model.text_encoder.train``, the default), or keeps it frozen and caches its embeddings, so that
its steps no longer pay for the text encoder at all.

In-batch negatives seldom differ from a caption in one object's column or in which color goes with which
shape, so CLIP's objective alone need not learn them (measured: a 600-step stage told a caption from its
column-changed or color-swapped copy at chance). With ``text_train.hard_negatives`` each caption also
meets such copies (NegCLIP, Yuksekgonul et al. 2023): :func:`contrastive_loss`.

``transformers.CLIPModel`` does the work (its text tower is exactly the ``CLIPTextModel`` of the
pipeline; its loss is the symmetric cross-entropy of the paper): here only the small vision tower is
sized for the training images, and the trained text tower is copied out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

from ..config import TextTrainConfig


def build_contrastive_model(text_encoder: CLIPTextModel, text_train: TextTrainConfig, image_size: int) -> CLIPModel:
    """A ``CLIPModel`` whose text tower is ``text_encoder``'s (same config, same initial weights) and
    whose vision tower is a small ViT over ``image_size`` images; with ``text_train.freeze_embeddings``
    the text tower's token and position embeddings are frozen at their initial weights.

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
    if text_train.freeze_embeddings:
        model.text_model.embeddings.requires_grad_(False)
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


def contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3), with room for hard negatives (NegCLIP,
    Yuksekgonul et al. 2023, Sec. 4): the text side may hold more captions than there are images, the batch's
    own captions first and then false ones. Each image is then contrasted with every caption, false ones
    included, and each true caption with the batch's images; a false caption has no image of its own.

    Written here because ``CLIPModel``'s own loss needs as many captions as images; without extra captions
    the two are the same.

    Args:
        logits_per_image: ``(images, captions)`` similarities, ``CLIPModel``'s output of that name.
        logits_per_text: its transpose, ``(captions, images)``.
    """
    images = logits_per_image.shape[0]
    targets = torch.arange(images, device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text[:images], targets)) / 2


@torch.no_grad()
def hard_negative_accuracy(logits_per_image: torch.Tensor, owners: list[int]) -> torch.Tensor:
    """Share of hard negatives that score below their image's true caption; ``owners[n]`` is the image whose
    caption negative ``n`` (column ``images + n`` of ``logits_per_image``) was made from. Chance is 0.5."""
    images = logits_per_image.shape[0]
    owner = torch.tensor(owners, device=logits_per_image.device, dtype=torch.long)
    true = logits_per_image[owner, owner]
    false = logits_per_image[owner, images + torch.arange(len(owners), device=logits_per_image.device)]
    return (true > false).float().mean()


@torch.no_grad()
def retrieval_accuracy(logits_per_text: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Share of captions whose best-matching image in the batch is their own image or another one with
    exactly the same caption (short captions such as "a circle" fit several images)."""
    best = logits_per_text.argmax(dim=1).tolist()
    hits = [captions[i] == captions[j] for i, j in enumerate(best)]
    return torch.tensor(sum(hits) / len(hits), device=logits_per_text.device)
