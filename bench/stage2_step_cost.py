#!/usr/bin/env python
"""What one stage-2 training step of a config costs, and where the time goes, for config variants
side by side (one process, interleaved rounds).

    python bench/stage2_step_cost.py --config configs/shapes.yaml \
        --variant "model.text_encoder.max_position_embeddings=77 model.text_encoder.num_hidden_layers=3" \
        --variant "model.text_encoder.num_hidden_layers=3" --variant ""

Each variant builds the config's U-Net and text encoder (``latentdiff.models.build_components``) and
times the step of ``training/train_ldm.py`` on random latents and the data's longest kind of caption
(a full description of three objects): the text encoder's forward, the U-Net's forward with the
backward of both, and the AdamW update. The first ``--warmup`` steps of each round are discarded.
Reported: the median milliseconds per step and per part over ``--rounds`` rounds, and each variant's
speed relative to the first. Used for the text-path ablation of docs/conditioning.md.

``--flops`` also gives each variant's U-Net FLOPs per training step (three forwards' worth, counted on the meta
device by ``common.unet_forward_flops``), the FLOP rate that makes of the measured step, and each top-level
block's share of the forward: where a cheaper architecture would have to save.

A variant with ``train.attention_localization_weight`` (TokenCompose's token loss), or its ``_pixel_weight`` (the
pixel loss), records the cross-attention maps during the U-Net's forward and adds the losses, on the first ``batch``
captions and scenes of the config's shapes data (the text encoder's cost is the same: every caption is padded to the
tokenizer's length). For those variants the token loss's targets (the captions' noun phrases and their objects' masks, built in Python) are also timed alone, cold
(every (caption, scene) new, as in stage 2's first epoch) and cached (as in the later ones):

    python bench/stage2_step_cost.py --config configs/shapes.yaml --variant "" \
        --variant "train.attention_localization_weight=0.01" --recomputed-maps

A variant with ``train.mixed_precision=bf16`` runs the U-Net's forward under bf16 autocast with torch's math
attention kernel, as a bf16 training run on a CPU does (``latentdiff.trainer.loop.use_math_attention_on_cpu``):

    python bench/stage2_step_cost.py --config configs/shapes.yaml --variant "" --variant "train.mixed_precision=bf16"

The maps are recorded where the attention computes them (a ``CrossAttentionRecorder`` installed for the variant, as
stage 2 keeps one for the run); ``--recomputed-maps`` also times each token-loss variant with them recomputed by
forward pre-hooks beside the fused processor, the way before the forty-fifth round of docs/conditioning.md, as its own
row (not for compiled variants: the hooks are set for each step, which would compile the U-Net again).

A variant with ``train.compile=true`` times the U-Net ``torch.compile``-d as stage 2 compiles it (``train.compile_backend``,
inductor by default); its first step, which compiles forward and backward, is reported on its own line (the warmup
steps are not timed):

    python bench/stage2_step_cost.py --config configs/shapes.yaml --variant "train.compile=false" --variant ""

(the shapes default compiles since the forty-eighth round; ``""`` is the config as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import time
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from latentdiff.config import load_config
from latentdiff.models import build_components
from latentdiff.models.builders import vae_scale_factor

from latentdiff.data.shapes import make_shapes_dataset
from latentdiff.pipelines.attention_binding import CrossAttentionRecorder, cross_attention_maps
from latentdiff.trainer.attention_localization import ObjectTokens, localization_loss, localization_pixel_loss

from common import TRAINING_FLOPS_PER_FORWARD, unet_forward_flops, unet_forward_flops_by_block

CAPTION = "a large yellow circle at the top right, a small orange circle at the bottom left and a large blue triangle at the bottom right on a black background"


class StepParts(NamedTuple):
    """What a variant's timed step runs on."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ids: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    token_loss: tuple[Any, ...] | None
    """(weights, captions, scenes, vocabulary, blocks) for a variant with the token or pixel loss, else None."""
    precision: Callable[[], Any]
    """A context for the U-Net's forward in the variant's precision (:func:`autocast`)."""
    forward: Callable[..., Any]
    """The U-Net, or the U-Net ``torch.compile``-d (``train.compile``)."""
    recorder: CrossAttentionRecorder | None
    """The maps' recorder, installed on the U-Net for a variant with the token or pixel loss."""
    first_step: list[float]
    """Seconds of the variant's first step (a compiled variant's compiling), once run."""


def build(config_file: str, variant: str) -> StepParts:
    config = load_config(config_file, shlex.split(variant))
    components = build_components(config.model, config.data.resolution)
    unet, text_encoder, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    text_encoder.requires_grad_(config.model.text_encoder.train)
    parameters = [p for module in (unet, text_encoder) for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)
    batch = config.train.batch_size
    token_loss = None
    captions = [CAPTION] * batch
    train = config.train
    if train.attention_localization_weight or train.attention_localization_pixel_weight:  # the data's own captions
        # and scenes, for the losses' targets
        shapes = config.data.shapes
        data = make_shapes_dataset(batch, seed=config.seed, image_size=config.data.resolution,
                                   holdout=tuple(shapes.holdout), captions_per_image=shapes.captions_per_image,
                                   full_caption=shapes.full_caption, progress_bar=False)
        captions = [row[0] for row in data["captions"]]
        scenes = [scene["objects"] for scene in data["scene"]]
        weights = (train.attention_localization_weight, train.attention_localization_pixel_weight)
        token_loss = (weights, captions, scenes, ObjectTokens(tokenizer), train.attention_localization_blocks)
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    size = config.data.resolution // vae_scale_factor(config.model)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    timesteps = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))
    if train.channels_last:  # as stage 2 converts its trained modules
        unet.to(memory_format=torch.channels_last)
    recorder = None
    if token_loss:
        recorder = CrossAttentionRecorder([unet], blocks=train.attention_localization_blocks).install()
    forward = torch.compile(unet, backend=train.compile_backend) if train.compile else unet
    return StepParts(unet, text_encoder, optimizer, ids, latents, timesteps, token_loss,
                     partial(autocast, train.mixed_precision), forward, recorder, [])


def autocast(mixed_precision: str):
    """The U-Net's forward (and so its backward) as a training run of this precision on a CPU computes it: under
    bf16 autocast with torch's math attention kernel (``latentdiff.trainer.loop.use_math_attention_on_cpu``; scoped
    here so that interleaved variants each get their own)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision != "bf16":
        raise SystemExit(f"train.mixed_precision={mixed_precision}: this benchmark times CPU steps, in 'no' or 'bf16'")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def time_steps(parts, steps: int, warmup: int, recompute: bool = False) -> list[tuple[float, float, float]]:
    unet, text_encoder, optimizer, ids, latents, timesteps, token_loss, precision, forward, recorder, first_step = parts
    times = []
    for step in range(steps + warmup):
        start = time.perf_counter()
        with torch.set_grad_enabled(any(p.requires_grad for p in text_encoder.parameters())):
            states = text_encoder(ids)[0]
        text_done = time.perf_counter()
        if recompute:
            recording = cross_attention_maps([unet], recompute=True, blocks=token_loss[-1])
        else:
            recording = recorder.recording() if recorder else contextlib.nullcontext([])
        with precision(), recording as maps:
            loss = (forward(latents, timesteps, encoder_hidden_states=states).sample.float() - latents).pow(2).mean()
        if token_loss:
            (weight, pixel_weight), captions, scenes, vocabulary, _ = token_loss
            loss = loss + weight * localization_loss(maps, captions, scenes, vocabulary)
            if pixel_weight:
                loss = loss + pixel_weight * localization_pixel_loss(maps, captions, scenes, vocabulary)
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if not first_step:
            first_step.append(end - start)
        if step >= warmup:
            times.append((text_done - start, backward_done - text_done, end - backward_done))
    return times


def time_token_loss_targets(parts, rounds: int) -> tuple[float, float]:
    """Median milliseconds of the token loss's targets for the batch, (cold, cached): the loss on constant maps of the
    shapes the U-Net's cross-attention layers record, with a fresh vocabulary each time, and with one that has seen
    the batch."""
    unet, text_encoder, ids, latents, timesteps = parts.unet, parts.text_encoder, parts.ids, parts.latents, parts.timesteps
    _, captions, scenes, vocabulary, _ = parts.token_loss
    with torch.no_grad(), parts.recorder.recording() as recorded:
        unet(latents, timesteps, encoder_hidden_states=text_encoder(ids)[0])
    maps = [torch.full_like(layer, 1 / layer.shape[-1]) for layer in recorded]
    timings = {"cold": [], "cached": []}
    for _ in range(rounds):
        for kind in timings:
            words = vocabulary
            if kind == "cold":
                words = ObjectTokens(vocabulary.tokenizer)
            start = time.perf_counter()
            localization_loss(maps, captions, scenes, words)
            timings[kind].append(time.perf_counter() - start)
    return tuple(1000 * statistics.median(t) for t in timings.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--variant", action="append", required=True, help="space-separated key=value overrides ('' = the config)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flops", action="store_true", help="also count FLOPs per step and by U-Net block")
    parser.add_argument("--recomputed-maps", action="store_true",
                        help="also time each token-loss variant with its maps recomputed by pre-hooks")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [build(args.config, variant) for variant in args.variant]
    # (row label, the variant's parts, whether its maps are recomputed by hooks)
    rows = [(variant, parts, False) for variant, parts in zip(args.variant, models)]
    if args.recomputed_maps:
        rows += [(f"{variant or '(the config)'}, maps recomputed by hooks", parts, True)
                 for variant, parts in zip(args.variant, models) if parts.token_loss and parts.forward is parts.unet]
    results = {label: [] for label, _, _ in rows}
    for _ in range(args.rounds):
        for label, parts, recompute in rows:
            results[label] += time_steps(parts, args.steps, args.warmup, recompute)
    print(f"threads: {torch.get_num_threads()}, batch {models[0].ids.shape[0]}, {args.rounds} rounds of {args.steps} steps")
    print("| variant | ms per step | text encoder forward | U-Net forward + backward | AdamW | speed vs first |")
    print("|---|---|---|---|---|---|")
    first = None
    for label, times in results.items():
        text, network, update = (1000 * statistics.median(t[i] for t in times) for i in range(3))
        total = 1000 * statistics.median(sum(t) for t in times)
        first = first or total
        print(f"| {label or '(the config)'} | {total:.0f} | {text:.0f} | {network:.0f} | {update:.0f} | {first / total:.2f}x |")
    for variant, parts in zip(args.variant, models):
        if parts.forward is not parts.unet:
            print(f"{variant}: the first step, compiling, took {parts.first_step[0]:.1f} s")
    localized = [(variant, parts) for variant, parts in zip(args.variant, models) if parts.token_loss]
    if localized:
        print()
        print("| variant | token loss targets, cold: ms per batch | cached |")
        print("|---|---|---|")
        for variant, parts in localized:
            cold, cached = time_token_loss_targets(parts, 5 * args.rounds)
            print(f"| {variant or '(the config)'} | {cold:.1f} | {cached:.1f} |")
    if args.flops:
        print()
        print("| variant | U-Net GFLOP per training step (3 forwards' worth) | GFLOP/s of the measured step | share of the U-Net's forward by block |")
        print("|---|---|---|---|")
        for variant, parts in zip(args.variant, models):
            config = load_config(args.config, shlex.split(variant))
            size, batch = config.data.resolution // vae_scale_factor(config.model), parts.ids.shape[0]
            gflop = TRAINING_FLOPS_PER_FORWARD * unet_forward_flops(config.model, size, batch) / 1e9
            shares = unet_forward_flops_by_block(config.model, size, batch)
            total = statistics.median(sum(t) for t in results[variant])
            blocks = ", ".join(f"{name} {share:.2f}" for name, share in shares.items())
            print(f"| {variant or '(the config)'} | {gflop:.1f} | {gflop / total:.0f} | {blocks} |")


if __name__ == "__main__":
    main()
