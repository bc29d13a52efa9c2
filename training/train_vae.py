#!/usr/bin/env python
"""Stage 1: train the autoencoder (``diffusers.AutoencoderKL``) that maps images to latents.

    accelerate launch training/train_vae.py --config configs/shapes.yaml [key=value ...]

Reconstruction (L1) + KL loss, with optional perceptual and adversarial terms
(:mod:`latentdiff.trainer.autoencoder`). After training, the latent scaling factor (1 / std of the latents,
Rombach et al. 2022, App. G) is measured on the data and stored in the VAE's config, so stage 2 and
every pipeline scale latents the same way. On the built-in shapes data the script ends by checking the
autoencoder with the prompt-adherence judge (:func:`check_reconstructions`, ``vae_train.judge_scenes``):
a latent model draws no better than its decoder renders, so it warns when the judge reads few
reconstructions right. With ``vae_train.decoder_finetune_steps``, the decoder alone (encoder frozen) trains on
whole images for that many steps after ``max_steps``, before the scale is measured.

Outputs under ``output_dir``: ``vae/`` (Diffusers format, safetensors), ``vae_reconstructions.png``
(originals above their reconstructions), ``vae_checkpoints/checkpoint-<step>`` and ``config.yaml``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from latentdiff.eval.judge import reconstruction_agreement
from latentdiff.trainer.autoencoder import (
    AutoencoderForTraining,
    PatchDiscriminator,
    VGGPerceptualLoss,
    decoder_parameters,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_loss,
    measure_scaling_factor,
    normalize_latents,
    reconstruction_loss,
    scale_equivariance_loss,
    vae_reconstructor,
)
from latentdiff.trainer.checkpointing import (
    NonFiniteLossGuard,
    TrainingState,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from latentdiff.config import Config, ConfigError, parse_args, save_config
from latentdiff.data.loading import collate_image_text, make_training_dataset
from latentdiff.files import folder_written_in_place
from latentdiff.models import build_vae
from latentdiff.trainer.loop import (
    batch_size_of,
    epoch_batches,
    init_trackers,
    log_images,
    make_accelerator,
    make_train_dataloader,
    per_process_batch_size,
    replicate_under_fsdp_launch,
    run_training_script,
    setup_logging,
    tensor_to_pil,
)
from latentdiff.trainer.rng import TrainingRNG, random_crop

logger = logging.getLogger("latentdiff.train_vae")

VAE_DIR = "vae"
# Stage 1 keeps its checkpoints apart from stage 2's, in the same output_dir.
STAGE_DIR = "vae_stage"


def main(argv: list[str] | None = None) -> None:
    config: Config = parse_args(argv, description=__doc__.split("\n\n")[0])
    train = config.vae_train
    stage_dir = os.path.join(config.output_dir, STAGE_DIR)
    report_to = train.report_to if train.report_to is not None else config.train.report_to
    total_steps = train.max_steps + train.decoder_finetune_steps
    fsdp_launch = replicate_under_fsdp_launch()  # a small model: replicated, not sharded (see its docstring)
    # The decoder fine-tune leaves the encoder without gradient: DistributedDataParallel must expect that.
    accelerator = make_accelerator(config, train.mixed_precision, train.gradient_accumulation_steps, report_to, "vae",
                                   find_unused_parameters=train.decoder_finetune_steps > 0)
    setup_logging(accelerator)
    if fsdp_launch:
        logger.info("an FSDP launch: the autoencoder is replicated on every process (data-parallel), not sharded")

    # 1. Check the configuration before any heavy work.
    if config.model.pixel_space:
        raise ConfigError("model.pixel_space=true has no autoencoder to train; run training/train_ldm.py directly")
    if config.model.vae.pretrained:
        raise ConfigError(
            f"model.vae.pretrained={config.model.vae.pretrained!r}: the autoencoder is already trained; "
            "stage 1 trains one from scratch (unset model.vae.pretrained to train a new one)"
        )
    batch_per_process = per_process_batch_size(
        train.batch_size, accelerator.num_processes, train.gradient_accumulation_steps, "vae_train.batch_size"
    )
    perceptual = VGGPerceptualLoss(train.lpips_weights) if train.perceptual_weight > 0 else None
    if accelerator.is_main_process:
        save_config(config, config.output_dir, name="config_vae.yaml")
    set_seed(config.seed)
    rng = TrainingRNG(config.seed, accelerator)

    # 2. Model, data, optimizers.
    vae = build_vae(config.model)
    scale_factor = train.scale_equivariance_factor if train.scale_equivariance_weight > 0 else None
    autoencoder = AutoencoderForTraining(vae, scale_factor).train()
    discriminator = PatchDiscriminator() if train.adversarial_weight > 0 else None
    dataset = make_training_dataset(
        config.data, seed=config.seed, batch_size=batch_per_process,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index,
    )
    dataloader = make_train_dataloader(dataset, batch_per_process, collate_image_text, config.data.num_workers, accelerator)
    optimizer_config = train.optimizer
    adam = dict(
        lr=optimizer_config.learning_rate,
        betas=(optimizer_config.adam_beta1, optimizer_config.adam_beta2),
        weight_decay=optimizer_config.adam_weight_decay,
        eps=optimizer_config.adam_epsilon,
    )
    optimizer = torch.optim.AdamW(autoencoder.parameters(), **adam)
    lr_scheduler = get_scheduler(
        optimizer_config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=optimizer_config.lr_warmup_steps, num_training_steps=train.max_steps,
    )
    # The decoder fine-tune after max_steps: its own AdamW over the decoder side only (fresh moments, no weight
    # decay, constant rate after warmup), so the encoder, and with it the latents stage 2 learns, stays as the
    # joint training left it.
    decoder_finetune = []
    if train.decoder_finetune_steps:
        decoder_optimizer = torch.optim.AdamW(
            decoder_parameters(vae),
            **{**adam, "lr": train.decoder_finetune_learning_rate, "weight_decay": 0.0},
        )
        decoder_finetune = [decoder_optimizer, get_scheduler(
            "constant_with_warmup", optimizer=decoder_optimizer, num_warmup_steps=train.decoder_finetune_warmup_steps)]
    if perceptual is not None:
        perceptual.to(accelerator.device)
    # (the decoder fine-tune's optimizer and schedule go last, so that checkpoints without them still load)
    if discriminator is not None:
        discriminator_optimizer = torch.optim.AdamW(discriminator.parameters(), **adam)
        autoencoder, discriminator, optimizer, discriminator_optimizer, lr_scheduler, *decoder_finetune = accelerator.prepare(
            autoencoder, discriminator, optimizer, discriminator_optimizer, lr_scheduler, *decoder_finetune
        )
    else:
        autoencoder, optimizer, lr_scheduler, *decoder_finetune = accelerator.prepare(
            autoencoder, optimizer, lr_scheduler, *decoder_finetune)

    # 3. Resume from the newest intact checkpoint.
    state = TrainingState()
    checkpoint = find_resume_checkpoint(accelerator, stage_dir, config.resume)
    if checkpoint:
        state = load_checkpoint(accelerator, checkpoint, rng)
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
    init_trackers(accelerator, "latentdiff-vae", config)
    guard = NonFiniteLossGuard(stage_dir)  # no checkpoint or export of non-finite weights
    saved_modules = [autoencoder] + ([discriminator] if discriminator is not None else [])

    # 4. The training loop.
    progress = tqdm(total=total_steps, initial=state.global_step, desc="train vae",
                    disable=not accelerator.is_local_main_process)
    log_sums: dict[str, torch.Tensor] = {}
    log_count, last_batch = 0, None
    interval_start, interval_images = time.perf_counter(), 0
    while state.global_step < total_steps:
        for batch in epoch_batches(accelerator, dataloader, dataset, state.epoch, state.epoch_batches):
            state.epoch_batches += 1
            state.skipped_images += int(batch["num_skipped"])
            # A batch whose every image failed to decode still takes part, with weight 0 (see train_ldm.py).
            loss_weight = 1.0 if batch_size_of(batch) else 0.0
            batch = batch if loss_weight else last_batch
            if batch is None:
                continue
            last_batch = batch
            images = batch["pixel_values"]
            decoder_phase = state.global_step >= train.max_steps  # the decoder fine-tune: whole images, encoder frozen
            step_optimizer, step_schedule = decoder_finetune if decoder_phase else (optimizer, lr_scheduler)
            cropping = not decoder_phase and train.crop_size is not None and (
                train.crop_steps is None or state.global_step < train.crop_steps)
            if cropping and train.crop_size < images.shape[-1]:
                images = random_crop(images, train.crop_size, rng.generator)
            use_adversarial = discriminator is not None and state.global_step >= train.adversarial_start_step
            with accelerator.accumulate(autoencoder):
                reconstructions, posterior_mean, posterior_logvar, downscaled = autoencoder(
                    images, rng.generator, decoder_only=decoder_phase)
                terms = {
                    "reconstruction": reconstruction_loss(images, reconstructions, train.reconstruction_loss),
                    "kl": kl_loss(posterior_mean, posterior_logvar),
                }
                loss = terms["reconstruction"] + train.kl_weight * terms["kl"]
                if downscaled is not None:
                    terms["scale_equivariance"] = scale_equivariance_loss(
                        images, downscaled, scale_factor, train.reconstruction_loss)
                    loss = loss + train.scale_equivariance_weight * terms["scale_equivariance"]
                if perceptual is not None:
                    terms["perceptual"] = perceptual(images, reconstructions)
                    loss = loss + train.perceptual_weight * terms["perceptual"]
                if use_adversarial:
                    terms["generator_adversarial"] = generator_adversarial_loss(discriminator(reconstructions))
                    loss = loss + train.adversarial_weight * terms["generator_adversarial"]
                guard.observe(loss, state.global_step + 1)
                accelerator.backward(loss * loss_weight)
                if accelerator.sync_gradients and optimizer_config.max_grad_norm:
                    accelerator.clip_grad_norm_(autoencoder.parameters(), optimizer_config.max_grad_norm)
                step_optimizer.step()
                step_optimizer.zero_grad(set_to_none=True)
            if use_adversarial:
                with accelerator.accumulate(discriminator):
                    # The generator's backward also left gradients on the discriminator: drop them.
                    discriminator_optimizer.zero_grad(set_to_none=True)
                    # Real and fake in one forward: DistributedDataParallel expects one forward per backward.
                    logits_real, logits_fake = discriminator(torch.cat([images, reconstructions.detach()])).chunk(2)
                    terms["discriminator"] = hinge_discriminator_loss(logits_real, logits_fake)
                    guard.observe(terms["discriminator"], state.global_step + 1)
                    accelerator.backward(terms["discriminator"] * loss_weight)
                    discriminator_optimizer.step()
                    discriminator_optimizer.zero_grad(set_to_none=True)
            for name, value in itertools.chain(terms.items(), [("loss", loss)]):
                log_sums[name] = log_sums.get(name, 0.0) + value.detach()
            log_count += 1
            interval_images += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            step_schedule.step()
            state.global_step += 1
            state.images_seen += train.batch_size
            progress.update(1)
            if state.global_step % train.log_every == 0 or state.global_step == total_steps:
                guard.check(accelerator, state.global_step)  # syncs
                logs = {name: accelerator.reduce(total / log_count, reduction="mean").item() for name, total in log_sums.items()}
                logs["images_per_s"] = interval_images / (time.perf_counter() - interval_start)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_s']:.1f}")
                accelerator.log(logs, step=state.global_step)
                log_sums.clear()
                log_count = 0
                interval_start, interval_images = time.perf_counter(), 0
            if train.checkpointing_steps and (
                state.global_step % train.checkpointing_steps == 0 or state.global_step == total_steps
            ):
                guard.check(accelerator, state.global_step, [p for m in saved_modules for p in m.parameters()])
                save_checkpoint(accelerator, stage_dir, state, train.checkpoints_total_limit, rng)
            if state.global_step == train.max_steps and train.decoder_finetune_steps:
                logger.info("joint training done at step %d; the decoder alone trains on whole images for %d more "
                            "(vae_train.decoder_finetune_steps)", state.global_step, train.decoder_finetune_steps)
            if state.global_step >= total_steps:
                break
        else:  # the epoch ran out before the last step
            if state.epoch_batches == 0:
                raise ConfigError(
                    f"the dataset yields no batch of {batch_per_process} images per process; "
                    "lower vae_train.batch_size or add data"
                )
            state.epoch, state.epoch_batches = state.epoch + 1, 0
    progress.close()

    # 5. Measure the latent scale on the data, save the VAE and a grid of reconstructions.
    accelerator.wait_for_everyone()
    guard.check(accelerator, state.global_step, [p for m in saved_modules for p in m.parameters()])
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(autoencoder).vae.eval()
        dataset.set_epoch(0)
        measure_loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_per_process, shuffle=False, collate_fn=collate_image_text
        )
        images = (batch["pixel_values"] for batch in measure_loader if batch_size_of(batch))
        batches = itertools.islice(images, -(-train.scaling_samples // batch_per_process))
        if train.normalize_latents:
            mean, std = normalize_latents(vae, batches, generator=rng.generator)
            logger.info(
                "latents standardized per channel inside the autoencoder (measured mean %s, std %s)",
                [round(v, 3) for v in mean], [round(v, 3) for v in std],
            )
        else:
            scaling_factor = measure_scaling_factor(vae, batches, generator=rng.generator)
            vae.register_to_config(scaling_factor=scaling_factor)
            logger.info("latent scaling factor (1 / std of latents): %.5f", scaling_factor)

        folder = os.path.join(config.output_dir, VAE_DIR)
        with folder_written_in_place(folder) as partial:
            vae.save_pretrained(partial, safe_serialization=True)

        originals = next(b["pixel_values"] for b in measure_loader if batch_size_of(b))[:8].to(accelerator.device)
        with torch.no_grad():
            reconstructed = vae.decode(vae.encode(originals).latent_dist.mode()).sample
        grid = make_image_grid(tensor_to_pil(torch.cat([originals, reconstructed])), rows=2, cols=originals.shape[0])
        grid.save(os.path.join(config.output_dir, "vae_reconstructions.png"))
        log_images(accelerator, "reconstructions", grid, state.global_step)
        logger.info("autoencoder saved to %s", folder)
        if config.data.source == "shapes" and train.judge_scenes:
            check_reconstructions(accelerator, config, vae, state.global_step)
    accelerator.end_training()


def check_reconstructions(accelerator, config: Config, vae, step: int) -> None:
    """Log how often the shapes judge reads a reconstruction as its scene, and warn when it is low:
    a latent model draws no better than its decoder renders, and a weak autoencoder otherwise shows only
    in the samples, an hour of stage 2 later (docs/conditioning.md, eighteenth round)."""
    train = config.vae_train
    report = reconstruction_agreement(vae_reconstructor(vae), train.judge_scenes, image_size=config.data.resolution)
    agreement, read = report["agreement"], f"{report['agreed']}/{report['num_scenes']}"
    accelerator.log({"reconstruction_agreement": agreement}, step=step)
    if agreement >= train.min_judge_agreement:
        logger.info("the judge reads %s fresh scenes (%.3f) right through the autoencoder (images with each kind "
                    "of difference: %s)", read, agreement, report["differences"] or "none")
    else:
        longer = f"vae_train.max_steps={2 * train.max_steps}"
        if train.crop_steps is not None:
            longer += f" vae_train.crop_steps={train.crop_steps + train.max_steps}"
        logger.warning(
            "the judge reads only %s fresh scenes (%.3f) right through this autoencoder, below "
            "vae_train.min_judge_agreement=%s (images with each kind of difference: %s). A model trained on it "
            "draws no better than it reconstructs: train stage 1 longer in a new output_dir (%s) or with "
            "another seed before stage 2.",
            read, agreement, train.min_judge_agreement, report["differences"], longer,
        )


if __name__ == "__main__":
    run_training_script(main, "train_vae.py")
