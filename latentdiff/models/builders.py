"""Build the components of a latent text-to-image model from a :class:`~latentdiff.config.ModelConfig`.

Each component is a stock Diffusers / transformers class (``AutoencoderKL``,
``UNet2DConditionModel``, ``CLIPTextModel``, ``CLIPTokenizer``), or, for the OpenCLIP text tower,
:class:`latentdiff.models.text_encoders.OpenCLIPTextModel`. Each comes either from the architecture fields
of the config or, when ``pretrained`` is set, from a folder or Hub id with ``from_pretrained``. The named
architectures are in :mod:`latentdiff.models.presets`.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..config import ConfigError, ModelConfig, TextEncoderConfig
from .presets import MODEL_PRESETS
from .tokenizer import CONTEXT_LENGTH, clip_tokenizer

__all__ = [
    "MODEL_PRESETS",
    "build_vae",
    "build_unet",
    "build_text_encoder",
    "build_tokenizer",
    "build_components",
    "vae_scale_factor",
    "ModelMixin",
]


def vae_scale_factor(config: ModelConfig) -> int:
    """How many times smaller (per side) the latent is than the image: 1 in pixel space."""
    if config.pixel_space:
        return 1
    return 2 ** (len(config.vae.block_out_channels) - 1)


def _is_local_path(name_or_path: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else (``./x``, ``/x``, ``a/b/c``) is a path."""
    return os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def _from_pretrained(model_class, name_or_path: str, subfolder: str | None, what: str, **kwargs):
    """``model_class.from_pretrained`` with errors that name the config key and the path."""
    if _is_local_path(name_or_path):
        folder = os.path.join(name_or_path, subfolder or "")
        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"{what}: no folder at {name_or_path!r} (expected a local folder or a Hub id)")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{what}: {name_or_path!r} has no subfolder {subfolder!r}")
    try:
        return model_class.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    except OSError as error:
        where = f"{name_or_path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise OSError(f"{what}: could not load {model_class.__name__} from {where}: {error}") from error


def build_vae(config: ModelConfig, in_channels: int = 3) -> AutoencoderKL | None:
    """The autoencoder of ``config``; ``None`` for a pixel-space model."""
    if config.pixel_space:
        return None
    vae = config.vae
    if vae.pretrained:
        return _from_pretrained(AutoencoderKL, vae.pretrained, vae.subfolder, "model.vae.pretrained")
    levels = len(vae.block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=vae.block_out_channels,
        layers_per_block=vae.layers_per_block,
        latent_channels=vae.latent_channels,
        norm_num_groups=vae.norm_num_groups,
        scaling_factor=vae.scaling_factor,
    )


def build_unet(config: ModelConfig, sample_size: int, in_channels: int | None = None) -> UNet2DConditionModel:
    """The conditional U-Net of ``config`` for ``sample_size`` x ``sample_size`` latents (or pixels)."""
    unet = config.unet
    if unet.pretrained:
        return _from_pretrained(UNet2DConditionModel, unet.pretrained, unet.subfolder, "model.unet.pretrained")
    if in_channels is None:
        in_channels = 3 if config.pixel_space else config.vae.latent_channels
    if len(unet.down_block_types) != len(unet.block_out_channels) or len(unet.up_block_types) != len(
        unet.block_out_channels
    ):
        raise ConfigError(
            "model.unet: down_block_types, up_block_types and block_out_channels must have the same length, "
            f"got {len(unet.down_block_types)}, {len(unet.up_block_types)} and {len(unet.block_out_channels)}"
        )
    for channels in unet.block_out_channels:
        if channels % unet.attention_head_dim or channels % unet.norm_num_groups:
            raise ConfigError(
                f"model.unet.block_out_channels: {channels} is not divisible by attention_head_dim "
                f"({unet.attention_head_dim}) and norm_num_groups ({unet.norm_num_groups})"
            )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=unet.down_block_types,
        up_block_types=unet.up_block_types,
        block_out_channels=unet.block_out_channels,
        layers_per_block=unet.layers_per_block,
        cross_attention_dim=_text_hidden_size(config.text_encoder),
        # Diffusers' historical naming: `attention_head_dim` holds the number of heads for SD 1.x
        # configs. We store channels per head and convert, so every level keeps 1 head per N channels.
        attention_head_dim=tuple(c // unet.attention_head_dim for c in unet.block_out_channels),
        transformer_layers_per_block=unet.transformer_layers_per_block,
        norm_num_groups=unet.norm_num_groups,
    )


def _text_hidden_size(text_encoder: TextEncoderConfig) -> int:
    """The text encoder's width, which is the U-Net's cross-attention width."""
    if text_encoder.kind == "open_clip" and text_encoder.open_clip_model:
        from .text_encoders import open_clip_text_config

        return int(open_clip_text_config(text_encoder.open_clip_model)["width"])
    if text_encoder.pretrained:
        config_path = os.path.join(text_encoder.pretrained, text_encoder.subfolder or "", "config.json")
        if os.path.isfile(config_path):
            import json

            with open(config_path, encoding="utf-8") as file:
                data = json.load(file)
            return int(data.get("hidden_size") or data["width"])
    return text_encoder.hidden_size


def build_text_encoder(config: ModelConfig) -> torch.nn.Module:
    """The text encoder of ``config``: ``CLIPTextModel`` or the OpenCLIP text tower."""
    text = config.text_encoder
    if text.kind == "open_clip":
        from .text_encoders import OpenCLIPTextModel

        if text.open_clip_model:  # an OpenCLIP architecture, with weights from a checkpoint file if given
            return OpenCLIPTextModel.from_open_clip(text.open_clip_model, pretrained=text.pretrained)
        if text.pretrained:
            return _from_pretrained(OpenCLIPTextModel, text.pretrained, text.subfolder, "model.text_encoder.pretrained")
        return OpenCLIPTextModel(
            width=text.hidden_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            mlp_ratio=text.intermediate_size / text.hidden_size,
            context_length=text.max_position_embeddings,
            hidden_act=text.hidden_act,
        )
    if text.pretrained:
        return _from_pretrained(CLIPTextModel, text.pretrained, text.subfolder, "model.text_encoder.pretrained")
    tokenizer_vocab_size = 49408
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer_vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            max_position_embeddings=text.max_position_embeddings,
            hidden_act=text.hidden_act,
            # OpenAI CLIP's special-token ids: the pooled output is read at the end-of-text token.
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )


def build_tokenizer(config: ModelConfig) -> CLIPTokenizer:
    """The tokenizer: from ``model.tokenizer`` if set, else CLIP's, built offline."""
    if config.tokenizer:
        return _from_pretrained(CLIPTokenizer, config.tokenizer, None, "model.tokenizer")
    tokenizer = clip_tokenizer()
    if tokenizer.model_max_length != CONTEXT_LENGTH:  # pragma: no cover - guarded by clip_tokenizer
        raise AssertionError("the CLIP tokenizer's context is 77 tokens")
    return tokenizer


def build_components(config: ModelConfig, resolution: int) -> dict[str, object]:
    """Every component for images of ``resolution`` pixels: vae, unet, text_encoder, tokenizer.

    Raises:
        ValueError: ``resolution`` is not a multiple of the autoencoder's downsampling factor.
    """
    factor = vae_scale_factor(config)
    if config.vae.pretrained and not config.pixel_space:
        vae = build_vae(config)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        config = replace(config, vae=replace(config.vae, latent_channels=vae.config.latent_channels))
    else:
        vae = build_vae(config)
    if resolution % factor:
        raise ConfigError(
            f"data.resolution={resolution} is not divisible by the autoencoder's downsampling factor {factor}; "
            f"use a multiple of {factor}"
        )
    return {
        "vae": vae,
        "unet": build_unet(config, sample_size=resolution // factor),
        "text_encoder": build_text_encoder(config),
        "tokenizer": build_tokenizer(config),
    }
