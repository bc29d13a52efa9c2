#!/usr/bin/env python
"""Stage 2: train a text-conditional U-Net on the latents of a frozen autoencoder.

    accelerate launch training/train_ldm.py --config configs/shapes.yaml [key=value ...]

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): images are encoded once per step by the frozen VAE of stage 1 (or a pretrained one), a CLIP
text encoder embeds the captions (trained from scratch with the U-Net, or pretrained and frozen), and
the U-Net learns to denoise the latents conditioned on the text through cross-attention. With
``model.pixel_space=true`` there is no autoencoder and the U-Net works on pixels, as in DDPM. With
``model.high_noise_boundary`` a second U-Net, a high-noise expert, is trained beside it on the samples of
the timesteps at and above the boundary (:mod:`latentdiff.models.experts`); with ``model.high_noise_pretrained``
too, that expert is a trained U-Net kept frozen, and only the U-Net below the boundary trains (the low-noise
expert stage, ``training/train_low_noise_expert.py``).

Outputs under ``output_dir``: ``config.yaml`` (the resolved config), ``checkpoints/checkpoint-<step>``
(``resume=latest`` continues the newest), ``validation/step-<step>.png``, ``logs/`` (tensorboard) and
``pipeline/``: a Diffusers folder (EMA weights, safetensors) with ``samples.png`` and a model card.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings

import torch
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from latentdiff.trainer.checkpointing import (
    NonFiniteLossGuard,
    TrainingState,
    find_resume_checkpoint,
    load_checkpoint,
    local_tensor,
    save_checkpoint,
)
from latentdiff.config import Config, ConfigError, parse_args, save_config, timesteps_left_untrained
from latentdiff.data.loading import ImageTextDataset, collate_image_text, make_training_dataset
from latentdiff.diffusion import (
    AdaptiveLossWeighting,
    CaptionGap,
    TimestepSampling,
    adaptive_weights,
    diffusion_loss,
    make_noise_scheduler,
    snr_clamp_for,
    timestep_sampling_for,
)
from latentdiff.trainer.latent_cache import (
    CachedLatentDataset,
    TextEmbeddingCache,
    collate_latents,
    latent_cache_dir,
    load_or_build_latent_cache,
)
from latentdiff.models import build_components, build_text_encoder, build_vae
from latentdiff.models.experts import NoiseLevelExperts
from latentdiff.pipelines.attention_binding import CrossAttentionRecorder
from latentdiff.trainer.attention_localization import ObjectTokens, localization_loss, localization_pixel_loss
from latentdiff.trainer.probes import CaptionGapProbe, adherence_probe, held_examples
from latentdiff.sampling import SAMPLES_FILE, export_pipeline, make_pipeline, sample_grid
from latentdiff.trainer.encoding import encode_images, tokenize
from latentdiff.trainer.loop import (
    batch_size_of,
    epoch_batches,
    full_model,
    init_trackers,
    log_images,
    make_accelerator,
    make_train_dataloader,
    per_process_batch_size,
    run_training_script,
    setup_logging,
)
from latentdiff.trainer.rng import TrainingRNG, drop_captions

logger = logging.getLogger("latentdiff.train_ldm")


def main(argv: list[str] | None = None) -> None:
    config: Config = parse_args(argv, description=__doc__.split("\n\n")[0])
    train = config.train
    accelerator = make_accelerator(
        config, train.mixed_precision, train.gradient_accumulation_steps, train.report_to, "ldm"
    )
    setup_logging(accelerator)

    # 1. Check the configuration against the machine before any heavy work.
    batch_per_process = per_process_batch_size(
        train.batch_size, accelerator.num_processes, train.gradient_accumulation_steps, "train.batch_size"
    )
    if accelerator.distributed_type == DistributedType.FSDP and config.model.text_encoder.train:
        raise ConfigError(
            "model.text_encoder.train=true under FSDP: Accelerate's FSDP 2 prepares a single model, the U-Net; "
            "set model.text_encoder.train=false (a frozen or pretrained text encoder), or launch without FSDP"
        )
    if accelerator.distributed_type == DistributedType.FSDP and config.diffusion.adaptive_loss_weighting:
        raise ConfigError(
            "diffusion.adaptive_loss_weighting=true under FSDP: Accelerate's FSDP 2 prepares a single model, the "
            "U-Net; set diffusion.adaptive_loss_weighting=false, or launch without FSDP"
        )
    if accelerator.distributed_type == DistributedType.FSDP and config.model.high_noise_boundary is not None:
        raise ConfigError("model.high_noise_boundary: noise-level experts (trained or frozen) are not supported under "
                          "FSDP; use DDP")
    if not config.model.pixel_space and not config.model.vae.pretrained:
        stage1_vae = os.path.join(config.output_dir, "vae")
        if not os.path.isfile(os.path.join(stage1_vae, "config.json")):
            raise ConfigError(
                f"no autoencoder: model.vae.pretrained is not set and stage 1's output {stage1_vae!r} does not exist. "
                "Run training/train_vae.py with the same config first, or set model.vae.pretrained to a VAE folder or "
                "Hub id (or model.pixel_space=true for a pixel-space model)."
            )
        config.model.vae.pretrained = stage1_vae
    text = config.model.text_encoder
    if text.contrastive_pretraining and not text.pretrained:
        pretrained_text = os.path.join(config.output_dir, "text_encoder")
        if not os.path.isfile(os.path.join(pretrained_text, "config.json")):
            raise ConfigError(
                f"model.text_encoder.contrastive_pretraining is on but {pretrained_text!r} does not exist: run "
                "training/train_text.py with the same config first"
            )
        text.pretrained = pretrained_text
    for low, high, setting in timesteps_left_untrained(config):
        logger.warning("diffusion.timestep_range=%s: no stage trains t in [%d, %d), so the exported pipeline denoises "
                       "them with an untrained band (fine for a band expert used with another U-Net; %s covers them)",
                       list(config.diffusion.timestep_range), low, high, setting)
    if accelerator.is_main_process:
        save_config(config, config.output_dir)
    set_seed(config.seed)
    rng = TrainingRNG(config.seed, accelerator)

    # 2. Components: frozen VAE, text encoder (trained or frozen), U-Net, noise schedule.
    components = build_components(config.model, config.data.resolution)
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    noise_scheduler = make_noise_scheduler(config.diffusion)
    train_text_encoder = config.model.text_encoder.train
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # With the latent cache the autoencoder encodes each image once, so it does so in float32 whatever the
    # training's precision: stage 2 then learns the latents the exported float32 autoencoder decodes.
    vae_dtype = torch.float32 if train.cache else weight_dtype
    if vae is not None:
        vae.requires_grad_(False).eval().to(accelerator.device, dtype=vae_dtype)
    text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
    if train_text_encoder and hasattr(text_encoder, "freeze_pooling_only_parameters"):
        text_encoder.freeze_pooling_only_parameters()  # the OpenCLIP tower: see its docstring
    if not train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    unets = [unet] + ([components["unet_high_noise"]] if "unet_high_noise" in components else [])
    frozen_high_noise = None
    if config.model.high_noise_pretrained:  # the low-noise expert stage: the U-Net above the boundary stays as it is
        # Kept in float32, so that the export saves it as loaded; under mixed precision autocast runs it in half.
        frozen_high_noise = unets.pop().requires_grad_(False).eval().to(accelerator.device)
    for module in unets:
        module.train()
        if train.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        if train.channels_last:
            module.to(memory_format=torch.channels_last)
    if len(unets) == 2:  # noise-level experts: each sample of a batch goes to the U-Net of its timestep
        unet = NoiseLevelExperts(unet, unets[1], config.model.high_noise_boundary)
    if train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trained_modules = [unet, text_encoder] if train_text_encoder else [unet]
    num_models = len(trained_modules)
    loss_weighting = None
    if config.diffusion.adaptive_loss_weighting:
        # Optimized and checkpointed with the models; not averaged, clipped or exported: it only weights the loss.
        loss_weighting = AdaptiveLossWeighting(config.diffusion.num_train_timesteps, seed=config.seed)
        trained_modules.append(loss_weighting.to(accelerator.device))

    # 3. Data: images and captions, or latents (and text embeddings) cached once by the frozen encoders.
    dataset = make_training_dataset(
        config.data, seed=config.seed, batch_size=batch_per_process,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index,
    )
    collate_fn = collate_image_text
    text_embeddings = None
    if train.cache and not train_text_encoder:
        text_embeddings = TextEmbeddingCache(text_encoder, tokenizer, accelerator.device)
        if isinstance(dataset, ImageTextDataset):  # map-style: every caption is known, encode them all now
            text_embeddings.precompute(
                ["", *dataset.distinct_captions()], batch_per_process, show_progress=accelerator.is_local_main_process
            )
    if train.cache and vae is not None:
        cache = load_or_build_latent_cache(
            dataset, vae, accelerator, config.data, latent_cache_dir(config), batch_per_process
        )
        with_objects = bool(train.attention_localization_weight or train.attention_localization_pixel_weight)
        dataset = CachedLatentDataset(cache, dataset, with_objects=with_objects)
        collate_fn = collate_latents
    dataloader = make_train_dataloader(dataset, batch_per_process, collate_fn, config.data.num_workers, accelerator)

    def encode_text(captions: list[str]) -> torch.Tensor:
        if text_embeddings is not None:
            return text_embeddings(captions)
        return text_encoder(tokenize(tokenizer, captions).to(accelerator.device))[0]

    caption_gap_probe = None
    if train.caption_gap_steps:
        held_pixels, held_captions = held_examples(config.data, config.seed, train.caption_gap_images)
        held_latents = encode_images(vae, held_pixels.to(accelerator.device, vae_dtype), None, mean=True).float()
        caption_gap_probe = CaptionGapProbe(held_latents, held_captions, encode_text, seed=config.seed)

    # 4. Optimizers (one per band of noise levels with train.band_boundary), learning-rate schedules, EMA.
    optimizer_config = train.optimizer
    learning_rate = optimizer_config.learning_rate
    if train.scale_lr:
        learning_rate *= train.batch_size
    def make_optimizer(parameters: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            parameters,
            lr=learning_rate,
            betas=(optimizer_config.adam_beta1, optimizer_config.adam_beta2),
            weight_decay=optimizer_config.adam_weight_decay,
            eps=optimizer_config.adam_epsilon,
            fused=optimizer_config.fused or None,
        )

    optimizers = [make_optimizer([p for module in trained_modules for p in module.parameters() if p.requires_grad])]
    if train.band_boundary:  # the high band's optimizer: its own moments, and maybe a part of the U-Net only
        pattern = re.compile(train.high_band_parameters or "")
        optimizers.append(make_optimizer(
            [p for name, p in trained_modules[0].named_parameters() if p.requires_grad and pattern.search(name)]
            + [p for module in trained_modules[1:] for p in module.parameters() if p.requires_grad]
        ))
    lr_schedulers = [
        get_scheduler(
            optimizer_config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=optimizer_config.lr_warmup_steps,
            num_training_steps=train.max_steps,
        )
        for optimizer in optimizers
    ]
    if train.band_boundary and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("train.band_boundary: an optimizer per band is not supported under FSDP; use DDP")
    prepared = accelerator.prepare(*trained_modules, *optimizers, *lr_schedulers)
    num_optimizers = len(optimizers)
    trained_modules = list(prepared[: -2 * num_optimizers])
    optimizers = list(prepared[-2 * num_optimizers : -num_optimizers])
    lr_schedulers = list(prepared[-num_optimizers:])
    unet = trained_modules[0]
    if train_text_encoder:
        text_encoder = trained_modules[1]
    if loss_weighting is not None:
        loss_weighting = trained_modules[-1]
    # train.token_mixing_from_step: the text encoder's token mixing (zero at the start) waits for that step
    delayed_mixing = [p for name, p in text_encoder.named_parameters() if "token_mixing." in name] if train_text_encoder else []
    # The parameters as Accelerate prepared them: under FSDP they are new (sharded) tensors, so the
    # EMA, gradient clipping, validation and export must use these, not the ones from before prepare.
    trained_parameters = [p for module in trained_modules[:num_models] for p in module.parameters() if p.requires_grad]
    # Each process averages its own part of the weights: under FSDP its shards (views into the
    # parameters; the average is elementwise, so averaging the shards averages the whole), which keeps
    # the EMA in plain tensors. Otherwise these are the parameters themselves.
    ema_parameters = [local_tensor(p) for p in trained_parameters]
    ema = None
    if train.use_ema:
        # Saved by save_checkpoint as safetensors + JSON, not registered with Accelerate (which pickles).
        ema = EMAModel(
            ema_parameters, decay=train.ema_decay, use_ema_warmup=train.ema_warmup, power=3 / 4, foreach=True
        )
    # The training step's forward, compiled with train.compile. The probes, validation and export call the eager
    # `unet` (the same weights): in eval mode, without gradients and at other batch sizes, the compiled one would
    # compile again for each.
    unet_step = unet
    if train.compile:
        unet_step = torch.compile(unet, backend=train.compile_backend)
        # Diffusers' upsampling blocks call `is_torch_version`, a pure function behind functools.lru_cache, and
        # TorchDynamo warns at every such call that it traces through the cache ("silent incorrectness is only a
        # potential risk").
        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function "
                                r"at 'upsampling\.py")

    # 5. Resume: weights, optimizer, EMA, RNG states and the position in the data, from the newest
    # intact checkpoint.
    state = TrainingState()
    checkpoint = find_resume_checkpoint(accelerator, config.output_dir, config.resume)
    if checkpoint:
        state = load_checkpoint(accelerator, checkpoint, rng, ema)
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
    guard = NonFiniteLossGuard(config.output_dir)  # no checkpoint, validation or export of non-finite weights

    def weights_to_save() -> list[torch.Tensor]:
        return trained_parameters + (ema.shadow_params if ema is not None else [])

    init_trackers(accelerator, "latentdiff-ldm", config)

    def with_frozen_expert(trained_unet: torch.nn.Module) -> torch.nn.Module:
        """The denoiser that sampling and the probes see: with a frozen high-noise expert, the two together."""
        if frozen_high_noise is None:
            return trained_unet
        return NoiseLevelExperts(trained_unet, frozen_high_noise, config.model.high_noise_boundary)

    def measure_caption_gap(step: int) -> None:
        """The caption gap of the weights being trained, on the held batch; logged per band."""
        unet.eval()
        text_encoder.eval()
        denoiser = with_frozen_expert(unet)
        with accelerator.autocast():  # the frozen expert is float32 and outside Accelerate's autocast of the U-Net
            gap = caption_gap_probe.measure(lambda x, t, c: denoiser(x, t, c).sample, noise_scheduler, step)
        accelerator.log(gap.logs(), step=step)
        unet.train()
        text_encoder.train(train_text_encoder)

    def validate(step: int) -> None:
        """Sample the fixed validation prompts with the EMA weights; save and log the grid."""
        guard.check(accelerator, step, weights_to_save())
        if ema is not None:
            ema.store(ema_parameters)
            ema.copy_to(ema_parameters)
        unet.eval()
        text_encoder.eval()
        sampled_unet, sampled_text_encoder = full_model(accelerator, unet), full_model(accelerator, text_encoder)
        if accelerator.is_main_process:
            pipeline = make_pipeline(vae, sampled_text_encoder, tokenizer, with_frozen_expert(sampled_unet), noise_scheduler)
            with accelerator.autocast():
                grid = sample_grid(pipeline, config.sample, device=accelerator.device)
            os.makedirs(os.path.join(config.output_dir, "validation"), exist_ok=True)
            grid.save(os.path.join(config.output_dir, "validation", f"step-{step:06d}.png"))
            log_images(accelerator, "validation", grid, step)
            if train.adherence_probe_prompts and config.data.source == "shapes":
                with accelerator.autocast():
                    probe = adherence_probe(
                        pipeline, config.data.shapes.holdout, train.adherence_probe_prompts,
                        train.adherence_probe_steps, config.sample.guidance_scale,
                        guidance_interval=config.sample.guidance_interval, negative_prompt=config.sample.negative_prompt,
                        negative_prompt_carry=config.sample.negative_prompt_carry,
                    )
                accelerator.log(probe, step=step)
                adherence_history.append({"step": step, **probe})
                logger.info("adherence probe at step %d: %.3f overall", step, probe["adherence_probe/overall"])
        if ema is not None:
            ema.restore(ema_parameters)
        unet.train()
        text_encoder.train(train_text_encoder)

    # 6. The training loop.
    adherence_history: list[dict] = []
    if train.band_boundary:  # [low band, high band]: each step draws from one, steps with its optimizer
        band_samplings = [TimestepSampling("uniform", high=train.band_boundary),
                          TimestepSampling("uniform", low=train.band_boundary)]
    progress = tqdm(
        total=train.max_steps, initial=state.global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    logger.info(
        "training %d steps, %d images per step (%d per process per forward), %d process(es) on %s",
        train.max_steps, train.batch_size, batch_per_process, accelerator.num_processes, accelerator.device,
    )
    loss_sum = torch.zeros((), device=accelerator.device)
    # TokenCompose's token and pixel losses on the objects' places (train.attention_localization_weight and
    # train.attention_localization_pixel_weight), logged beside the loss.
    localizing = train.attention_localization_weight or train.attention_localization_pixel_weight
    localized_words = ObjectTokens(tokenizer, background=train.attention_localization_background) if localizing else None
    # Kept on the U-Net for the run (the same processors at every step, so a compiled forward traces them once); it
    # records only inside `recording()`, and the probes and validation run the stock processors.
    attention_recorder = None
    if localizing:
        attention_recorder = CrossAttentionRecorder([unet], blocks=train.attention_localization_blocks).install()
    localization_sum = torch.zeros((), device=accelerator.device)
    pixel_localization_sum = torch.zeros((), device=accelerator.device)
    loss_count, last_batch = 0, None
    interval_start, interval_images = time.perf_counter(), 0
    while state.global_step < train.max_steps:
        for batch in epoch_batches(accelerator, dataloader, dataset, state.epoch, state.epoch_batches):
            state.epoch_batches += 1
            state.skipped_images += int(batch["num_skipped"])
            # A batch whose every image failed to decode still takes part in the step, with weight 0,
            # so that all processes run the same collective operations.
            loss_weight = 1.0 if batch_size_of(batch) else 0.0
            batch = batch if loss_weight else last_batch
            if batch is None:
                continue
            last_batch = batch
            band = int(state.global_step % train.high_band_every == train.high_band_every - 1) if train.band_boundary else 0
            optimizer = optimizers[band]
            if train.band_boundary:
                timestep_sampling = band_samplings[band]
            else:
                timestep_sampling = timestep_sampling_for(config.diffusion, state.global_step)
            with accelerator.accumulate(*trained_modules):
                if "latent_mean" in batch:  # cached posterior: z = mean + std * eps
                    noise = torch.randn(batch["latent_mean"].shape, generator=rng.generator, device=rng.generator.device)
                    latents = batch["latent_mean"] + batch["latent_std"] * noise.to(accelerator.device)
                else:
                    latents = encode_images(vae, batch["pixel_values"].to(vae_dtype), rng.generator).float()
                captions = drop_captions(batch["captions"], train.caption_dropout, rng.generator)
                if text_embeddings is not None:
                    encoder_hidden_states = text_embeddings(captions)
                else:
                    with torch.set_grad_enabled(train_text_encoder):
                        encoder_hidden_states = text_encoder(tokenize(tokenizer, captions).to(accelerator.device))[0]
                if train.compile and not encoder_hidden_states.requires_grad:
                    # A frozen text encoder's states (cached in its weights' precision) enter the compiled U-Net as a
                    # trained one's do, in float32 and asking for a gradient (unused), so that the graph is the one
                    # stage 2 compiled: the low-noise expert stage then finds it in Inductor's cache instead of
                    # compiling its own (57 s of its 3 min 20 s on 2 cores).
                    encoder_hidden_states = encoder_hidden_states.float().requires_grad_()
                snr_clamp_low = snr_clamp_for(config.diffusion, captions, state.global_step, latents.device)
                # With attention localization, the U-Net's cross-attention maps are recorded during this forward.
                with attention_recorder.recording() if attention_recorder else contextlib.nullcontext() as attention:
                    output = diffusion_loss(
                        lambda x, t, c: unet_step(x, t, c).sample,
                        noise_scheduler,
                        latents,
                        encoder_hidden_states,
                        snr_gamma=config.diffusion.snr_gamma,
                        noise_offset=config.diffusion.noise_offset,
                        generator=rng.generator,
                        timestep_sampling=timestep_sampling,
                        snr_weight_floor=config.diffusion.snr_weight_floor,
                        snr_clamp_low=snr_clamp_low,
                        snr_clamp_from_timestep=config.diffusion.snr_clamp_from_timestep,
                        snr_clamp_pool=config.diffusion.snr_clamp_pool,
                        adaptive_weighting=loss_weighting,
                        foreground_weight=config.diffusion.foreground_loss_weight,
                        foreground_until=config.diffusion.foreground_loss_until,
                    )
                total_loss = output.loss
                if localized_words is not None:
                    localization = localization_loss(attention, captions, batch["objects"], localized_words)
                    total_loss = total_loss + train.attention_localization_weight * localization
                    localization_sum += localization.detach()
                    if train.attention_localization_pixel_weight:
                        pixels = localization_pixel_loss(attention, captions, batch["objects"], localized_words)
                        total_loss = total_loss + train.attention_localization_pixel_weight * pixels
                        pixel_localization_sum += pixels.detach()
                guard.observe(total_loss, state.global_step + 1)
                accelerator.backward(total_loss * loss_weight)
                if state.global_step < train.token_mixing_from_step:
                    for parameter in delayed_mixing:  # no gradient, so AdamW skips it (no decay, no moments yet)
                        parameter.grad = None
                if accelerator.sync_gradients and train.optimizer.max_grad_norm:
                    accelerator.clip_grad_norm_(trained_parameters, train.optimizer.max_grad_norm)
                optimizer.step()
                for each in optimizers:  # the high band's may hold part of the weights: clear every gradient
                    each.zero_grad(set_to_none=True)
            loss_sum += output.per_sample.detach().mean()  # the error itself, also under adaptive weighting
            loss_count += 1
            interval_images += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            for lr_scheduler in lr_schedulers:  # every band's schedule follows the global step
                lr_scheduler.step()
            if ema is not None:
                ema.step(ema_parameters)
            state.global_step += 1
            state.images_seen += train.batch_size
            progress.update(1)
            if state.global_step % train.log_every == 0 or state.global_step == train.max_steps:
                guard.check(accelerator, state.global_step)  # syncs
                loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()  # syncs
                images_per_second = interval_images / (time.perf_counter() - interval_start)
                logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_per_second}
                if localized_words is not None:
                    logs["attention_localization"] = accelerator.reduce(
                        localization_sum / max(loss_count, 1), reduction="mean").item()
                    localization_sum.zero_()
                    if train.attention_localization_pixel_weight:
                        logs["attention_localization_pixel"] = accelerator.reduce(
                            pixel_localization_sum / max(loss_count, 1), reduction="mean").item()
                        pixel_localization_sum.zero_()
                if loss_weighting is not None:  # the learned weight 1 / exp(u(t)) at the middle of each band
                    logs.update(adaptive_weights(accelerator.unwrap_model(loss_weighting)))
                progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.1f}")
                accelerator.log({**logs, "skipped_images": state.skipped_images}, step=state.global_step)
                loss_sum.zero_()
                loss_count = 0
                interval_start, interval_images = time.perf_counter(), 0
            if train.checkpointing_steps and (
                state.global_step % train.checkpointing_steps == 0 or state.global_step == train.max_steps
            ):
                guard.check(accelerator, state.global_step, weights_to_save())
                save_checkpoint(accelerator, config.output_dir, state, train.checkpoints_total_limit, rng, ema)
            if caption_gap_probe is not None and (
                state.global_step % train.caption_gap_steps == 0 or state.global_step == train.max_steps
            ):
                measure_caption_gap(state.global_step)
            if train.validation_steps and state.global_step % train.validation_steps == 0:
                validate(state.global_step)
            if state.global_step >= train.max_steps:
                break
        else:  # the epoch ran out before max_steps
            if state.epoch_batches == 0:
                raise ConfigError(
                    f"the dataset yields no batch of {batch_per_process} images per process; "
                    "lower train.batch_size or add data"
                )
            state.epoch, state.epoch_batches = state.epoch + 1, 0
    progress.close()
    if attention_recorder is not None:
        attention_recorder.remove()
    if caption_gap_probe is not None and caption_gap_probe.history and accelerator.is_main_process:
        last = caption_gap_probe.history[-1]
        logger.info(
            "caption gap at step %d (x0 error with the true / empty / shuffled caption): %s",
            last["step"], CaptionGap(last["bands"], last["true"], last["empty"], last["shuffled"]).summary(),
        )
        with open(os.path.join(config.output_dir, "caption_gap.json"), "w", encoding="utf-8") as file:
            json.dump(caption_gap_probe.history, file, indent=1)
    if adherence_history and accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "adherence_probe.json"), "w", encoding="utf-8") as file:
            json.dump(adherence_history, file, indent=1)
    if state.skipped_images:
        logger.warning("skipped %d images that failed to decode", state.skipped_images)

    # 7. Export: the Diffusers pipeline folder with the EMA weights, a sample grid and a model card.
    accelerator.wait_for_everyone()
    if train.export:
        guard.check(accelerator, state.global_step, weights_to_save())
        if ema is not None:
            ema.copy_to(ema_parameters)
        unet.eval()
        text_encoder.eval()
        exported_unet, exported_text_encoder = full_model(accelerator, unet), full_model(accelerator, text_encoder)
        if accelerator.is_main_process:
            # The frozen parts that ran in half precision are saved as they were loaded (float32); with the latent
            # cache the autoencoder already is.
            if vae_dtype != torch.float32:
                vae = build_vae(config.model)
            if weight_dtype != torch.float32 and not train_text_encoder:
                exported_text_encoder = build_text_encoder(config.model)
            pipeline = make_pipeline(vae, exported_text_encoder, tokenizer, with_frozen_expert(exported_unet), noise_scheduler)
            folder = export_pipeline(pipeline, config, state, device=accelerator.device)
            with Image.open(os.path.join(folder, SAMPLES_FILE)) as samples:
                log_images(accelerator, "samples", samples, state.global_step)
            logger.info("pipeline saved to %s", folder)
    accelerator.end_training()


if __name__ == "__main__":
    run_training_script(main, "train_ldm.py")
