"""Build the components of a latent text-to-image model from a :class:`~latentdiff.config.ModelConfig`.

Each component is a stock Diffusers / transformers class (``AutoencoderKL``,
``UNet2DConditionModel``, ``CLIPTextModel``, ``CLIPTokenizer``), or, for the OpenCLIP text tower,
:class:`latentdiff.models.text_encoders.OpenCLIPTextModel`. Each comes either from the architecture fields
of the config or, when ``pretrained`` is set, from a folder or Hub id with ``from_pretrained``. The named
architectures are in :mod:`latentdiff.models.presets`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from ..config import ConfigError, ModelConfig, TextEncoderConfig
from .presets import MODEL_PRESETS
from .tokenizer import CONTEXT_LENGTH, clip_tokenizer
from .unet import PositionalUNet2DConditionModel, saved_unet_class
from .bidirectional import BidirectionalCLIPTextModel
from .word_context import CLIPTextModelWithWordEmbeddings

logger = logging.getLogger(__name__)

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


def _from_pretrained(model_class, name_or_path: str, subfolder: str | None, what: str, **kwargs):
    """``model_class.from_pretrained`` with errors that name the config key and the path.

    A missing local path is ``no folder at ...`` before anything is loaded; a Hub id that cannot be
    loaded (offline, not cached, no such repo) says so in one line, as a missing folder.
    """
    from ..hub.loading import hub_load_error, locate_model

    expected = f"a local folder or Hub repo id holding a {model_class.__name__}"
    location = locate_model(name_or_path, what, expected)
    if location == "folder" and subfolder and not os.path.isdir(os.path.join(name_or_path, subfolder)):
        raise FileNotFoundError(f"{what}: {name_or_path!r} has no subfolder {subfolder!r}")
    try:
        if subfolder:  # transformers 5 refuses subfolder=None
            kwargs["subfolder"] = subfolder
        return model_class.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if location == "hub":
            raise hub_load_error(name_or_path, what, expected, error) from error
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
    """The conditional U-Net of ``config`` for ``sample_size`` x ``sample_size`` latents (or pixels).

    A loaded U-Net (``unet.pretrained``) gets ``sample_size`` in its config too: a pipeline draws at
    ``unet.config.sample_size`` by default, so a U-Net trained on further at another resolution would otherwise be
    saved, and sample, at the resolution it was first trained at.
    """
    unet = config.unet
    if unet.pretrained:
        unet_class = saved_unet_class(unet.pretrained, unet.subfolder)
        return _at_sample_size(
            _from_pretrained(unet_class, unet.pretrained, unet.subfolder, "model.unet.pretrained"), sample_size)
    if in_channels is None:
        in_channels = 3 if config.pixel_space else config.vae.latent_channels
    if len(unet.down_block_types) != len(unet.block_out_channels) or len(unet.up_block_types) != len(
        unet.block_out_channels
    ):
        raise ConfigError(
            "model.unet: down_block_types, up_block_types and block_out_channels must have the same length, "
            f"got {len(unet.down_block_types)}, {len(unet.up_block_types)} and {len(unet.block_out_channels)}"
        )
    # A level attends when its down block or its mirrored up block does; only those need whole heads.
    attends = [
        "CrossAttn" in down or "CrossAttn" in up
        for down, up in zip(unet.down_block_types, reversed(unet.up_block_types))
    ]
    for channels, level_attends in zip(unet.block_out_channels, attends):
        if channels % unet.norm_num_groups or (level_attends and channels % unet.attention_head_dim):
            needs = f"attention_head_dim ({unet.attention_head_dim}) and " if level_attends else ""
            raise ConfigError(
                f"model.unet.block_out_channels: {channels} is not divisible by {needs}"
                f"norm_num_groups ({unet.norm_num_groups})"
            )
    positions = {"position_frequencies": unet.position_frequencies} if unet.position_frequencies else {}
    unet_class = PositionalUNet2DConditionModel if positions else UNet2DConditionModel
    return unet_class(
        **positions,
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=unet.down_block_types,
        up_block_types=unet.up_block_types,
        block_out_channels=unet.block_out_channels,
        layers_per_block=unet.layers_per_block,
        cross_attention_dim=_text_hidden_size(config.text_encoder),
        # Diffusers' historical naming: `attention_head_dim` holds the number of heads for SD 1.x
        # configs. We store channels per head and convert, so every level keeps 1 head per N channels (a level
        # without attention, which may be narrower than one head, gets a head count it never uses: at least 1).
        attention_head_dim=tuple(max(1, c // unet.attention_head_dim) for c in unet.block_out_channels),
        transformer_layers_per_block=unet.transformer_layers_per_block,
        only_cross_attention=list(unet.only_cross_attention) if unet.only_cross_attention is not None else False,
        norm_num_groups=unet.norm_num_groups,
        addition_embed_type=unet.addition_embed_type,
        addition_embed_type_num_heads=unet.addition_embed_type_num_heads,
        resnet_time_scale_shift=unet.resnet_time_scale_shift,
    )


def _at_sample_size(unet: UNet2DConditionModel, sample_size: int) -> UNet2DConditionModel:
    """``unet`` with ``sample_size`` as the latent size its config records (the weights do not depend on it)."""
    if unet.config.sample_size != sample_size:
        logger.info("the loaded U-Net was saved for %s latents; this run uses %d x %d", unet.config.sample_size,
                    sample_size, sample_size)
        unet.register_to_config(sample_size=sample_size)
    return unet


def _text_hidden_size(text_encoder: TextEncoderConfig) -> int:
    """The width of the text encoder's conditioning, which is the U-Net's cross-attention width."""
    # The word embeddings beside the last layer's states, along the features or each in its own half, double the width.
    paths = 2 if text_encoder.word_embeddings_in_context and (
        text_encoder.word_embeddings_axis == "features" or text_encoder.word_path_own_projection) else 1
    if text_encoder.kind == "open_clip" and text_encoder.open_clip_model:
        from .text_encoders import open_clip_text_config

        return int(open_clip_text_config(text_encoder.open_clip_model)["width"])
    if text_encoder.pretrained:
        config_path = os.path.join(text_encoder.pretrained, text_encoder.subfolder or "", "config.json")
        if os.path.isfile(config_path):
            import json

            with open(config_path, encoding="utf-8") as file:
                data = json.load(file)
            return paths * int(data.get("hidden_size") or data["width"])
    return paths * text_encoder.hidden_size


def build_text_encoder(config: ModelConfig) -> torch.nn.Module:
    """The text encoder of ``config``: ``CLIPTextModel`` (with the word embeddings in its conditioning if
    ``word_embeddings_in_context``, without the causal mask if ``bidirectional``, with a causal convolution over its
    embeddings if ``token_mixing_width``) or the OpenCLIP text tower."""
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
    # The options below are CLIPTextConfig attributes, so that the saved folder reloads the same.
    model_class, options = CLIPTextModel, {}
    if text.bidirectional:
        model_class, options = BidirectionalCLIPTextModel, {"bidirectional": True}
    if text.token_mixing_width:
        model_class, options = BidirectionalCLIPTextModel, options | {
            "token_mixing_width": text.token_mixing_width, "token_mixing_depthwise": text.token_mixing_depthwise,
            "token_mixing_gated": text.token_mixing_gated}
    elif text.pretrained and getattr(_pretrained_text_config(text), "token_mixing_width", 0) and model_class is CLIPTextModel:
        # a folder saved with token mixing (e.g. stage 2's, loaded by the low-noise expert stage): CLIPTextModel
        # would drop its mixing weights; the class that reads config.token_mixing_width keeps them
        model_class = BidirectionalCLIPTextModel
    if text.word_embeddings_in_context:
        model_class = CLIPTextModelWithWordEmbeddings
        options |= {"word_embeddings_axis": text.word_embeddings_axis, "word_path_dropout": text.word_path_dropout,
                    "word_path_own_projection": text.word_path_own_projection}
    if text.pretrained:
        return _from_pretrained(model_class, text.pretrained, text.subfolder, "model.text_encoder.pretrained", **options)
    tokenizer_vocab_size = 49408
    model = model_class(
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
            **options,
        )
    )
    if text.zero_init_residual:
        # Written here: transformers initializes every projection at random and has no option for this.
        for layer in (module for module in model.modules() if isinstance(module, CLIPEncoderLayer)):
            for projection in (layer.self_attn.out_proj, layer.mlp.fc2):
                torch.nn.init.zeros_(projection.weight)
                torch.nn.init.zeros_(projection.bias)
    return model


def build_tokenizer(config: ModelConfig) -> CLIPTokenizer:
    """The tokenizer: from ``model.tokenizer`` if set, else CLIP's, built offline."""
    if config.tokenizer:
        return _from_pretrained(CLIPTokenizer, config.tokenizer, None, "model.tokenizer")
    tokenizer = clip_tokenizer()
    context = config.text_encoder.max_position_embeddings
    if config.text_encoder.pretrained:
        context = getattr(_pretrained_text_config(config.text_encoder), "max_position_embeddings", CONTEXT_LENGTH)
    if context < CONTEXT_LENGTH:
        # A text encoder trained from scratch may have a shorter context than CLIP's 77 tokens (the
        # shapes captions need at most 25): the tokenizer pads to it, and saves it in its
        # tokenizer_config.json, so every pipeline, stock ones included, pads the same way.
        tokenizer.model_max_length = context
    return tokenizer


def _pretrained_text_config(text: TextEncoderConfig):
    """The ``config.json`` of a local pretrained text encoder folder, as attributes (None if not local)."""
    path = os.path.join(text.pretrained, text.subfolder or "", "config.json")
    if not os.path.isfile(path):
        return None
    import json
    from types import SimpleNamespace

    with open(path, encoding="utf-8") as file:
        return SimpleNamespace(**json.load(file))


def build_components(config: ModelConfig, resolution: int) -> dict[str, object]:
    """Every component for images of ``resolution`` pixels: vae, unet, text_encoder, tokenizer, and
    unet_high_noise with ``config.high_noise_boundary`` (loaded from ``config.high_noise_pretrained`` when set).

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
    components = {
        "vae": vae,
        "unet": build_unet(config, sample_size=resolution // factor),
        "text_encoder": build_text_encoder(config),
        "tokenizer": build_tokenizer(config),
    }
    if config.high_noise_pretrained:  # a trained high-noise expert (the low-noise expert stage keeps it frozen)
        expert_class = saved_unet_class(config.high_noise_pretrained, config.high_noise_subfolder)
        components["unet_high_noise"] = _at_sample_size(_from_pretrained(
            expert_class, config.high_noise_pretrained, config.high_noise_subfolder, "model.high_noise_pretrained"
        ), resolution // factor)
    elif config.high_noise_boundary is not None:  # a high-noise expert of the same architecture
        components["unet_high_noise"] = build_unet(config, sample_size=resolution // factor)
    return components
