#!/usr/bin/env python
"""Optional stage between the autoencoder and the U-Net: contrastive pretraining of the text encoder.

    accelerate launch training/train_text.py --config configs/shapes.yaml [key=value ...]

Runs only when ``model.text_encoder.contrastive_pretraining`` is true (otherwise it says so and
exits). The text encoder of ``model.text_encoder`` is built from scratch and trained with CLIP's
objective (Radford et al. 2021) against a small vision transformer over the training images
(:mod:`latentdiff.trainer.text_pretraining`); the vision side is discarded. Stage 2
(``training/train_ldm.py``) then loads the text encoder from ``output_dir/text_encoder``.

Outputs under ``output_dir``: ``text_encoder/`` (a ``CLIPTextModel``, safetensors),
``text_stage/checkpoints/checkpoint-<step>`` (``resume=latest`` continues) and ``config_text.yaml``.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from latentdiff.config import Config, ConfigError, parse_args, save_config
from latentdiff.data.loading import collate_image_text, make_training_dataset
from latentdiff.files import folder_written_in_place
from latentdiff.models import build_text_encoder, build_tokenizer
from latentdiff.trainer.checkpointing import (
    TrainingState,
    load_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from latentdiff.data.shapes import hard_negative_captions
from latentdiff.trainer.text_pretraining import (
    build_contrastive_model,
    contrastive_loss,
    hard_negative_accuracy,
    retrieval_accuracy,
    text_encoder_of,
)
from latentdiff.trainer.encoding import tokenize
from latentdiff.trainer.loop import (
    batch_size_of,
    epoch_batches,
    make_accelerator,
    make_train_dataloader,
    per_process_batch_size,
    replicate_under_fsdp_launch,
    setup_logging,
)
from latentdiff.trainer.rng import TrainingRNG

logger = logging.getLogger("latentdiff.train_text")

TEXT_ENCODER_DIR = "text_encoder"
# This stage keeps its checkpoints apart from the other stages', in the same output_dir.
STAGE_DIR = "text_stage"


def main(argv: list[str] | None = None) -> None:
    config: Config = parse_args(argv, description=__doc__.split("\n\n")[0])
    text = config.model.text_encoder
    if not text.contrastive_pretraining:
        print("train_text.py: model.text_encoder.contrastive_pretraining is false: nothing to do")
        return
    train = config.text_train
    stage_dir = os.path.join(config.output_dir, STAGE_DIR)
    fsdp_launch = replicate_under_fsdp_launch()  # a small model: replicated, not sharded (see its docstring)
    accelerator = make_accelerator(config, train.mixed_precision, train.gradient_accumulation_steps, "tensorboard", "text")
    setup_logging(accelerator)
    if fsdp_launch:
        logger.info("an FSDP launch: the text encoder is replicated on every process (data-parallel), not sharded")

    # 1. Check the configuration before any heavy work.
    if text.kind != "clip" or text.pretrained:
        raise ConfigError(
            "model.text_encoder.contrastive_pretraining trains a CLIP text encoder from scratch: it needs "
            f"model.text_encoder.kind=clip and no model.text_encoder.pretrained (got kind={text.kind!r}, "
            f"pretrained={text.pretrained!r})"
        )
    batch_per_process = per_process_batch_size(
        train.batch_size, accelerator.num_processes, train.gradient_accumulation_steps, "text_train.batch_size"
    )
    if accelerator.is_main_process:
        save_config(config, config.output_dir, name="config_text.yaml")
    set_seed(config.seed)
    rng = TrainingRNG(config.seed, accelerator)

    # 2. Model, data, optimizer.
    tokenizer = build_tokenizer(config.model)
    try:
        image_size = train.image_encoder_resolution or config.data.resolution
        if config.data.resolution % image_size:
            raise ValueError(
                f"text_train.image_encoder_resolution={image_size} must divide data.resolution={config.data.resolution}"
            )
        model = build_contrastive_model(build_text_encoder(config.model), train, image_size).train()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    dataset = make_training_dataset(
        config.data, seed=config.seed, batch_size=batch_per_process,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index,
    )
    dataloader = make_train_dataloader(dataset, batch_per_process, collate_image_text, config.data.num_workers, accelerator)
    optimizer_config = train.optimizer
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=optimizer_config.learning_rate,
        betas=(optimizer_config.adam_beta1, optimizer_config.adam_beta2),
        weight_decay=optimizer_config.adam_weight_decay,
        eps=optimizer_config.adam_epsilon,
        fused=optimizer_config.fused or None,
    )
    lr_scheduler = get_scheduler(
        optimizer_config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=optimizer_config.lr_warmup_steps, num_training_steps=train.max_steps,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    # 3. Resume.
    state = TrainingState()
    if accelerator.is_main_process:
        remove_partial_checkpoints(stage_dir)
    accelerator.wait_for_everyone()
    checkpoint = resolve_resume(stage_dir, config.resume)
    if checkpoint:
        state = load_checkpoint(accelerator, checkpoint, rng)
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("latentdiff-text", config={"output_dir": config.output_dir, "max_steps": train.max_steps})

    # 4. The training loop: CLIP's symmetric cross-entropy over the batch, with NegCLIP's hard negatives on the
    #    text side when text_train.hard_negatives is on.
    progress = tqdm(total=train.max_steps, initial=state.global_step, desc="train text",
                    disable=not accelerator.is_local_main_process)
    loss_sum, accuracy_sum = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    negative_accuracy_sum, negative_batches, negatives_per_caption_sum = torch.zeros((), device=accelerator.device), 0, 0.0
    log_count, last_batch = 0, None
    interval_start, interval_images = time.perf_counter(), 0
    while state.global_step < train.max_steps:
        for batch in epoch_batches(accelerator, dataloader, dataset, state.epoch, state.epoch_batches):
            state.epoch_batches += 1
            state.skipped_images += int(batch["num_skipped"])
            loss_weight = 1.0 if batch_size_of(batch) else 0.0  # see train_ldm.py
            batch = batch if loss_weight else last_batch
            if batch is None:
                continue
            last_batch = batch
            captions, negatives, owners = batch["captions"], [], []
            if train.hard_negatives:
                # A function of (seed, process, epoch, batch), so a resumed run draws the same negatives.
                negative_rng = random.Random(
                    f"latentdiff-negatives/{config.seed}/{accelerator.process_index}/{state.epoch}/{state.epoch_batches}"
                )
                for owner, caption in enumerate(captions):
                    made = list(hard_negative_captions(caption, negative_rng).values())
                    negatives += made
                    owners += [owner] * len(made)
            with accelerator.accumulate(model):
                output = model(
                    input_ids=tokenize(tokenizer, captions + negatives).to(accelerator.device),
                    pixel_values=F.adaptive_avg_pool2d(batch["pixel_values"].to(accelerator.device), image_size),
                )
                loss = contrastive_loss(output.logits_per_image, output.logits_per_text)
                accelerator.backward(loss * loss_weight)
                if accelerator.sync_gradients and optimizer_config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), optimizer_config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            accuracy_sum += retrieval_accuracy(output.logits_per_text[: len(captions)].detach(), captions)
            if owners:
                negative_accuracy_sum += hard_negative_accuracy(output.logits_per_image.detach(), owners)
                negative_batches += 1
                negatives_per_caption_sum += len(owners) / len(captions)
            log_count += 1
            interval_images += len(batch["captions"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            lr_scheduler.step()
            state.global_step += 1
            state.images_seen += train.batch_size
            progress.update(1)
            if state.global_step % train.log_every == 0 or state.global_step == train.max_steps:
                logs = {
                    "loss": accelerator.reduce(loss_sum / log_count, reduction="mean").item(),
                    "retrieval_accuracy": accelerator.reduce(accuracy_sum / log_count, reduction="mean").item(),
                    "images_per_s": interval_images / (time.perf_counter() - interval_start),
                }
                if train.hard_negatives:
                    logs["hard_negative_accuracy"] = accelerator.reduce(
                        negative_accuracy_sum / max(negative_batches, 1), reduction="mean").item()
                    logs["hard_negatives_per_caption"] = negatives_per_caption_sum / log_count
                progress.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['retrieval_accuracy']:.2f}",
                                     **({"neg_acc": f"{logs['hard_negative_accuracy']:.2f}"} if train.hard_negatives else {}),
                                     img_s=f"{logs['images_per_s']:.0f}")
                accelerator.log(logs, step=state.global_step)
                loss_sum.zero_()
                accuracy_sum.zero_()
                negative_accuracy_sum.zero_()
                negative_batches, negatives_per_caption_sum = 0, 0.0
                log_count = 0
                interval_start, interval_images = time.perf_counter(), 0
            if train.checkpointing_steps and (
                state.global_step % train.checkpointing_steps == 0 or state.global_step == train.max_steps
            ):
                save_checkpoint(accelerator, stage_dir, state, train.checkpoints_total_limit, rng)
            if state.global_step >= train.max_steps:
                break
        else:  # the epoch ran out before max_steps
            if state.epoch_batches == 0:
                raise ConfigError(
                    f"the dataset yields no batch of {batch_per_process} images per process; "
                    "lower text_train.batch_size or add data"
                )
            state.epoch, state.epoch_batches = state.epoch + 1, 0
    progress.close()

    # 5. Save the text tower as the pipeline's text encoder.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder = os.path.join(config.output_dir, TEXT_ENCODER_DIR)
        with folder_written_in_place(folder) as partial:
            text_encoder_of(accelerator.unwrap_model(model)).save_pretrained(partial, safe_serialization=True)
        logger.info("text encoder saved to %s", folder)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError) as error:
        # Bad input is reported in one line before training starts, not as a traceback.
        print(f"train_text.py: error: {error}", file=sys.stderr)
        sys.exit(2)
