#!/usr/bin/env python
"""Training throughput: our trainer against Diffusers' text-to-image recipe, side by side.

    python bench/train_throughput.py --preset small                 # CPU, 64 px
    python bench/train_throughput.py --preset sd15 --resolution 512 # GPU, bf16
    python bench/train_throughput.py --preset sd15 --resolution 256 --compile --channels-last --fused-adamw

A (``ours``) is the real trainer, ``training/train_ldm.py``'s ``main(argv)``, run for a few steps
with the latent cache on (``train.cache=true``: the frozen VAE encodes every image once, and a
frozen text encoder every caption of the data, both before the first step); its images/s are the
``images_per_s`` it logs every ``train.log_every`` steps (read back from its tensorboard events). B
(``recipe``) is the training step of Diffusers' ``examples/text_to_image/train_text_to_image.py``,
reimplemented minimally below: VAE encode and text encode every step, noise, ``add_noise``, U-Net
forward, MSE, backward, gradient clipping, AdamW, EMA, the loss read back every step. Both sides use
the same components (built by ``latentdiff.models.build_components`` from one config, the VAE from
one saved folder), the same data, batch, resolution, mixed precision and data-loader workers, and
the same choice of training the text encoder or not: frozen in every preset, as in the recipe; with
``--override model.text_encoder.train=true`` (how the shapes model is trained, from scratch) both
sides train it, neither can cache text embeddings, and both run it forward and backward every step.

Each measurement is a fresh process (so each side's peak memory is its own), A and B interleaved
(A B, B A, A B, ...); the first ``--warmup-steps`` of every run are discarded. Reported: each side's
median images/s over rounds, the ratio A / B of the medians and the median of the per-round
ratios. MFU: the U-Net's forward FLOPs are counted once (``torch.utils.flop_counter.FlopCounterMode``),
a training step taken as 3 forward passes, and the achieved FLOP/s divided by the device's dense
bf16 peak (n/a on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    DEFAULT_RESULTS_FILE,
    REPO_ROOT,
    TRAINING_FLOPS_PER_FORWARD,
    PeakMemory,
    Report,
    bf16_peak_flops,
    check_device,
    command_line,
    format_bytes,
    format_flops,
    git_commit,
    interleaved,
    logged_scalars,
    machine_info,
    median,
    paired_ratios,
    ratio,
    run_worker,
    spread,
    unet_forward_flops,
    write_worker_result,
)

SIDES = ("ours", "recipe")


@dataclass(frozen=True)
class TrainPreset:
    """A benchmark setting: the model, the data, the batch and how long to measure."""

    config_file: str | None
    """The trainer's YAML config (relative to the repository root) that the overrides below go over."""
    model: str
    """``model.preset`` of the trainer's config (:data:`latentdiff.models.MODEL_PRESETS`)."""
    resolution: int
    batch_size: int
    device: str
    mixed_precision: str
    num_samples: int
    """Images of the built-in shapes data (the cache encodes them all once, before the rounds)."""
    rounds: int
    warmup_steps: int
    steps: int
    log_every: int
    num_workers: int
    threads: int | None = None
    """torch's CPU threads (``torch.set_num_threads`` and ``OMP_NUM_THREADS``); None: torch's default."""
    overrides: tuple[str, ...] = ()
    """Trainer config overrides of the preset, for both sides (``--override`` goes after them)."""


PRESETS: dict[str, TrainPreset] = {
    # The shapes demo's run (configs/shapes.yaml: its model, batch 64, min-SNR weighting, EMA) on a CPU,
    # with the text encoder frozen as the recipe has it (the shapes model trains its own from scratch:
    # `--override model.text_encoder.train=true` measures that setting, on both sides).
    # One thread: on a CPU shared with other work, a second OpenMP thread that waits for a busy core
    # makes every operator wait (measured here: 0.6 s per U-Net step on 1 thread, 3.5-15 s on 2).
    "small": TrainPreset("configs/shapes.yaml", "small", 64, 64, "cpu", "no", 256, rounds=3, warmup_steps=1, steps=3,
                         log_every=1, num_workers=0, threads=1, overrides=("model.text_encoder.train=false",)),
    # The Stable Diffusion 1.5 architecture on one GPU (pass --resolution 256 for the second figure).
    "sd15": TrainPreset(None, "sd15", 512, 16, "cuda", "bf16", 1024, rounds=3, warmup_steps=10, steps=30,
                        log_every=10, num_workers=8),
}
QUICK = TrainPreset(None, "tiny", 32, 4, "cpu", "no", 16, rounds=1, warmup_steps=1, steps=1, log_every=1,
                    num_workers=0, threads=1)
"""``--quick``: the tiny test model, one round of two steps, in this process: a smoke test, not a figure."""

SD15_BATCH_AT_256 = 64


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--quick", action="store_true", help="Tiny model, one short round, in-process: a smoke test.")
    shared = parser.add_argument_group("both sides (defaults from the preset)")
    shared.add_argument("--model", help="model.preset of the trainer's config (tiny, small, sd15, sd2), e.g. tiny for a dry run.")
    shared.add_argument("--resolution", type=int, help="Image size in pixels.")
    shared.add_argument("--batch-size", type=int, help="Images per optimizer step.")
    shared.add_argument("--device", help="cpu or cuda (the trainer takes the GPU whenever one is visible).")
    shared.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"))
    shared.add_argument("--num-workers", type=int, help="DataLoader worker processes.")
    shared.add_argument("--num-samples", type=int, help="Images in the shapes data.")
    shared.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for small, torch's own for sd15).")
    shared.add_argument("--rounds", type=int, help="A B rounds; the medians over rounds are compared.")
    shared.add_argument("--warmup-steps", type=int, help="Steps discarded at the start of every run.")
    shared.add_argument("--steps", type=int, help="Timed steps per run.")
    shared.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="A trainer config override for both sides, after the preset's, e.g. model.text_encoder.train=true.")
    ours = parser.add_argument_group("our trainer's switches (recorded with the figures)")
    ours.add_argument("--no-cache", action="store_true", help="train.cache=false: encode with the VAE every step.")
    ours.add_argument("--log-every", type=int, help="train.log_every: read the loss back every N steps.")
    ours.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    ours.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile the U-Net)")
    ours.add_argument("--fused-adamw", action="store_true", help="train.optimizer.fused=true (CUDA, and CPU in torch >= 2.4)")
    ours.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                      help="Any further trainer override for our side only, e.g. train.use_ema=false.")
    output = parser.add_argument_group("output")
    output.add_argument("--peak-tflops", type=float, help="Dense bf16 peak of the device for MFU (default: by GPU name).")
    output.add_argument("--record", nargs="?", const=DEFAULT_RESULTS_FILE, metavar="RESULTS_MD",
                        help="Append the result as a section of bench/RESULTS.md (or the file given).")
    output.add_argument("--json", metavar="PATH", help="Also write the figures as JSON.")
    output.add_argument("--workdir", help="Where the VAE, the latent cache and the runs go (default: a temporary folder).")
    output.add_argument("--in-process", action="store_true",
                        help="Run both sides in this process (faster start; peak memory is then not per side).")
    output.add_argument("--note", action="append", default=[], help="A note recorded with the figures.")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> TrainPreset:
    """The preset with the command line's values over it; checked before any heavy work."""
    preset = QUICK if args.quick else PRESETS[args.preset]
    if not args.quick and args.preset == "sd15" and args.resolution == 256 and args.batch_size is None:
        preset = replace(preset, resolution=256, batch_size=SD15_BATCH_AT_256)
    values = {
        "model": args.model, "resolution": args.resolution, "batch_size": args.batch_size, "device": args.device,
        "mixed_precision": args.mixed_precision, "num_workers": args.num_workers, "num_samples": args.num_samples,
        "rounds": args.rounds, "warmup_steps": args.warmup_steps, "steps": args.steps, "log_every": args.log_every,
        "threads": args.threads,
    }
    settings = replace(preset, **{key: value for key, value in values.items() if value is not None})
    for name in ("resolution", "batch_size", "num_samples", "rounds", "steps", "log_every"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.warmup_steps < 1 or settings.num_workers < 0:
        raise SystemExit(
            "--warmup-steps must be at least 1 (the clock starts when a step has finished) and --num-workers 0 or more"
        )
    if settings.steps % settings.log_every or settings.warmup_steps % settings.log_every:
        raise SystemExit(
            f"--steps ({settings.steps}) and --warmup-steps ({settings.warmup_steps}) must be multiples of --log-every "
            f"({settings.log_every}): our trainer reports images/s once per log interval"
        )
    if settings.threads is not None and settings.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {settings.threads}")
    if settings.num_samples < settings.batch_size:
        raise SystemExit(f"--num-samples ({settings.num_samples}) must be at least --batch-size ({settings.batch_size})")
    return settings


def config_files(settings: TrainPreset) -> list[str]:
    """The preset's YAML config as an absolute path (empty when the preset has none)."""
    return [os.path.join(REPO_ROOT, settings.config_file)] if settings.config_file else []


def shared_overrides(settings: TrainPreset, vae_folder: str, extra: Sequence[str] = ()) -> list[str]:
    """Trainer config overrides that define the work, the same for both sides (over the preset's YAML),
    then ``extra`` (``--override``)."""
    return [
        "seed=0",
        f"model.preset={settings.model}",
        f"model.vae.pretrained={vae_folder}",
        f"data.resolution={settings.resolution}",
        f"data.shapes.num_samples={settings.num_samples}",
        f"data.num_workers={settings.num_workers}",
        f"train.batch_size={settings.batch_size}",
        # Quoted: YAML reads a bare `no` as false.
        f"train.mixed_precision='{settings.mixed_precision}'",
        f"train.max_steps={settings.warmup_steps + settings.steps}",
        # A config's token mixing that starts partway (configs/shapes.yaml: at step 1,700) trains in every timed
        # step instead: the step as it runs once the mixing is on, and a start the short run would never reach.
        "train.token_mixing_from_step=0",
        *settings.overrides,
        *extra,
    ]


def our_overrides(args: argparse.Namespace, settings: TrainPreset) -> list[str]:
    """Overrides for our side only: its speed switches, and no validation, checkpoint or sampling
    inside the timed steps (the run's final checkpoint and export come after its last log)."""
    return [
        f"train.cache={str(not args.no_cache).lower()}",
        f"train.log_every={settings.log_every}",
        f"train.channels_last={str(args.channels_last).lower()}",
        f"train.compile={str(args.compile).lower()}",
        f"train.optimizer.fused={str(args.fused_adamw).lower()}",
        "train.report_to=tensorboard",
        "train.validation_steps=0",
        f"train.checkpointing_steps={10**9}",
        "sample.prompts=[a red circle]",
        "sample.images_per_prompt=1",
        "sample.num_inference_steps=1",
        *args.ours_override,
    ]


# --------------------------------------------------------------------------------------------
# Preparation: one VAE folder and one latent cache for every round
# --------------------------------------------------------------------------------------------


def prepare(workdir: str, settings: TrainPreset, trainer_overrides: list[str], cache: bool, device: str) -> None:
    """Save a seeded random VAE of the preset to ``workdir/vae`` and, with ``cache``, the trainer's
    latent cache to ``workdir/cache`` (each round's output folder links to it).

    The cache is written here, under the name and with the content the trainer would give it
    (``latentdiff.trainer.latent_cache.cache_key`` and ``encode_posteriors`` on the trainer's VAE in its
    weight dtype), so that building it happens once and outside every timed run.
    """
    import torch
    from safetensors.torch import save_file

    from latentdiff.config import load_config
    from latentdiff.data.loading import make_training_dataset
    from latentdiff.trainer.latent_cache import cache_key, encode_posteriors
    from latentdiff.models import build_vae

    vae_folder = os.path.join(workdir, "vae")
    config = load_config(config_files(settings), trainer_overrides)
    if not os.path.isfile(os.path.join(vae_folder, "config.json")):
        torch.manual_seed(0)
        build_vae(replace(config.model, vae=replace(config.model.vae, pretrained=None))).save_pretrained(vae_folder)
    if not cache:
        return
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)
    vae = build_vae(config.model).requires_grad_(False).eval().to(device, dtype=weight_dtype)
    path = os.path.join(workdir, "cache", f"latents-{cache_key(config.data, vae)}.safetensors")
    if os.path.isfile(path):
        return
    dataset = make_training_dataset(config.data, seed=config.seed)
    with torch.no_grad():
        tensors = encode_posteriors(dataset, vae, config.train.batch_size, torch.device(device))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # .contiguous(): the VAE's outputs can come back in channels-last strides, which safetensors refuses.
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, path)
    del vae
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# A: our trainer
# --------------------------------------------------------------------------------------------


def _load_trainer():
    """``training/train_ldm.py`` as a module (``training/`` is a folder of scripts, not a package)."""
    from latentdiff.testing import load_repository_script

    return load_repository_script("training", "train_ldm")


def ours_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the trainer for ``warmup + steps`` steps; its logged images/s after the warm-up."""
    memory = PeakMemory(spec["device"]).start()
    trainer = _load_trainer()
    trainer.main(list(spec["argv"]))
    memory.stop()
    events = logged_scalars(os.path.join(spec["output_dir"], "logs"), "images_per_s")
    timed = [(step, value, wall) for step, value, wall in events if step > spec["warmup_steps"]]
    if not timed:
        raise RuntimeError(f"the trainer logged no images_per_s after step {spec['warmup_steps']}: {events}")
    # Each log interval holds the same number of images, so the run's rate is the harmonic mean.
    images_per_s = len(timed) / sum(1 / value for _, value, _ in timed)
    return {
        "images_per_s": images_per_s,
        "interval_images_per_s": [value for _, value, _ in timed],
        "peak_memory": memory.peak_until(max(wall for _, _, wall in timed)),
    }


# --------------------------------------------------------------------------------------------
# B: Diffusers' recipe (examples/text_to_image/train_text_to_image.py), reimplemented minimally
# --------------------------------------------------------------------------------------------


def recipe_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The recipe's training loop on our components: VAE and text encoder run every step."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
    from tqdm.auto import tqdm

    from latentdiff.config import load_config
    from latentdiff.data.loading import collate_image_text, make_training_dataset
    from latentdiff.diffusion import make_noise_scheduler
    from latentdiff.models import build_components
    from latentdiff.trainer.encoding import tokenize

    memory = PeakMemory(spec["device"]).start()
    config = load_config(spec["config_files"], spec["overrides"])
    train, optimizer_config = config.train, config.train.optimizer
    accelerator = Accelerator(mixed_precision=train.mixed_precision, gradient_accumulation_steps=1)
    set_seed(config.seed)

    components = build_components(config.model, config.data.resolution)
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    noise_scheduler = make_noise_scheduler(config.diffusion)
    train_text_encoder = config.model.text_encoder.train  # the recipe freezes it; we match our side
    vae.requires_grad_(False)
    text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
    unet.train()
    if train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    trained_modules = [unet, text_encoder] if train_text_encoder else [unet]
    parameters = [p for module in trained_modules for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=optimizer_config.learning_rate, betas=(optimizer_config.adam_beta1, optimizer_config.adam_beta2),
        weight_decay=optimizer_config.adam_weight_decay, eps=optimizer_config.adam_epsilon,
    )

    # The recipe tokenizes in the dataset's transform, so in the DataLoader's workers.
    dataset = make_training_dataset(config.data, seed=config.seed)

    def collate(examples):
        batch = collate_image_text(examples)
        batch["input_ids"] = tokenize(tokenizer, batch["captions"])
        return batch

    loader = torch.utils.data.DataLoader(
        dataset, shuffle=True, collate_fn=collate, batch_size=train.batch_size, num_workers=config.data.num_workers,
        drop_last=True,
    )
    lr_scheduler = get_scheduler(
        optimizer_config.lr_scheduler, optimizer=optimizer, num_warmup_steps=optimizer_config.lr_warmup_steps,
        num_training_steps=train.max_steps,
    )
    prepared = accelerator.prepare(*trained_modules, optimizer, loader, lr_scheduler)
    unet, text_encoder = prepared[0], (prepared[1] if train_text_encoder else text_encoder)
    optimizer, loader, lr_scheduler = prepared[-3:]
    ema = None
    if train.use_ema:
        ema = EMAModel(parameters, decay=train.ema_decay, use_ema_warmup=train.ema_warmup, power=3 / 4)
        ema.to(accelerator.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    if not train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    prediction_type = noise_scheduler.config.prediction_type
    snr_gamma, noise_offset = config.diffusion.snr_gamma, config.diffusion.noise_offset

    step_ends: list[float] = []
    progress = tqdm(total=train.max_steps, desc="recipe")
    epoch = 0
    while len(step_ends) < train.max_steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(*trained_modules):
                with torch.no_grad():
                    latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                if noise_offset:
                    noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                with torch.set_grad_enabled(train_text_encoder):
                    encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
                if snr_gamma is None:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    if prediction_type == "v_prediction":
                        snr = snr + 1
                    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                    loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
                # The recipe reads the loss back every step: a host-device synchronisation.
                accelerator.gather(loss.repeat(train.batch_size)).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients and optimizer_config.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, optimizer_config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients and ema is not None:
                ema.step(parameters)
            loss.detach().item()  # the recipe's progress-bar postfix
            step_ends.append(time.perf_counter())
            progress.update(1)
            if len(step_ends) >= train.max_steps:
                break
        epoch += 1
    progress.close()
    memory.stop()

    warmup, steps = spec["warmup_steps"], spec["steps"]
    start = step_ends[warmup - 1]  # the clock starts when the last warm-up step has finished
    durations = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:])]
    return {
        "images_per_s": steps * train.batch_size / (step_ends[-1] - start),
        "interval_images_per_s": [train.batch_size / d for d in durations],
        "peak_memory": memory.peak_until(time.time()),
    }


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def _release_memory(device: str) -> None:
    """After an in-process run: collect its garbage (modules hold reference cycles) and return CUDA's
    cached blocks, so that the next run's peak (reset when it starts) holds none of this one's tensors."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_rounds(settings: TrainPreset, workdir: str, shared: list[str], ours_only: list[str], device: str,
               env: dict[str, str], in_process: bool, keep: bool) -> dict[str, list[dict[str, Any]]]:
    """Every run of the comparison, in the interleaved order; each side's results by round."""
    from tqdm.auto import tqdm

    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for round_index, side in tqdm(interleaved(settings.rounds, SIDES), desc="A/B runs"):
        spec = {"device": device, "warmup_steps": settings.warmup_steps, "steps": settings.steps}
        if side == "ours":
            output_dir = os.path.join(workdir, f"ours-round{round_index}")
            shutil.rmtree(output_dir, ignore_errors=True)
            os.makedirs(output_dir)
            if os.path.isdir(os.path.join(workdir, "cache")):
                os.symlink(os.path.join(workdir, "cache"), os.path.join(output_dir, "cache"))
            argv = [f"--config={path}" for path in config_files(settings)] + shared + ours_only
            spec.update(argv=argv + [f"output_dir={output_dir}"], output_dir=output_dir)
        else:
            spec.update(config_files=config_files(settings),
                        overrides=shared + [f"output_dir={os.path.join(workdir, 'recipe')}"])
        if in_process:
            result = (ours_worker if side == "ours" else recipe_worker)(spec)
            _release_memory(device)
        else:
            result = run_worker(os.path.abspath(__file__), side, spec, env)
        if side == "ours" and not keep:  # the run's final checkpoint and export are not needed again
            shutil.rmtree(spec["output_dir"], ignore_errors=True)
        results[side].append(result)
        tqdm.write(f"round {round_index + 1}/{settings.rounds} {side:>6}: {result['images_per_s']:.2f} images/s, "
                   f"peak memory {format_bytes(result['peak_memory'])}")
    return results


def describe_sides(config, args: argparse.Namespace, settings: TrainPreset) -> dict[str, str]:
    """What each side does per step, in words, printed and recorded with the figures."""
    train = config.train
    trained = config.model.text_encoder.train
    text = "trained (forward + backward every step)" if trained else "frozen"
    snr_gamma = config.diffusion.snr_gamma
    common_part = (
        f"{'min-SNR-' + str(snr_gamma) + ' weighted ' if snr_gamma else ''}{config.diffusion.prediction_type} loss, "
        f"AdamW, EMA {'on' if train.use_ema else 'off'}, grad clip {train.optimizer.max_grad_norm}, "
        f"mixed precision {train.mixed_precision}, {settings.num_workers} DataLoader workers"
    )
    if args.no_cache:
        ours_data = "VAE encode every step"
    else:
        ours_data = "latent cache (VAE posterior cached once; z = mean + std * eps per step)"
        if not trained:
            ours_data += " + text-embedding cache (every caption encoded once, before the first step)"
    switches = [name for name, on in (("channels_last", train.channels_last), ("torch.compile", train.compile),
                                      ("fused AdamW", train.optimizer.fused)) if on]
    return {
        "ours": (
            f"training/train_ldm.py main(): {ours_data}; text encoder {text}; {common_part}; "
            f"loss read back every {train.log_every} step(s)"
            + (f"; {', '.join(switches)}" if switches else "")
            + (f"; overrides {' '.join(args.ours_override)}" if args.ours_override else "")
        ),
        "recipe": (
            f"Diffusers train_text_to_image.py step: VAE encode every step (no_grad), text encoder {text}"
            f"{'' if trained else ', run every step (no_grad)'}; "
            f"{common_part}; loss read back every step"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        with open(args.spec, encoding="utf-8") as file:
            spec = json.load(file)
        result = (ours_worker if args.worker == "ours" else recipe_worker)(spec)
        write_worker_result(spec, result)
        return result

    # 1. Check the settings against the machine before any heavy work.
    settings = resolve_settings(args)
    device = check_device(settings.device)
    in_process = args.in_process or args.quick
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
        env["OMP_NUM_THREADS"] = str(settings.threads)
    machine = machine_info(device)
    commit, command = git_commit(), command_line()

    from latentdiff.config import load_config

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(workdir, exist_ok=True)
    shared = shared_overrides(settings, os.path.join(workdir, "vae"), args.override)
    ours_only = our_overrides(args, settings)
    config = load_config(config_files(settings), shared + ours_only)
    sides = describe_sides(config, args, settings)
    for side, text in sides.items():
        print(f"{side:>6}: {text}")
    from latentdiff.models import vae_scale_factor

    flops_per_image = TRAINING_FLOPS_PER_FORWARD * unet_forward_flops(
        config.model, settings.resolution // vae_scale_factor(config.model), 1
    )
    peak = bf16_peak_flops(device, args.peak_tflops)

    try:
        # 2. One VAE folder and one latent cache, outside every timed run.
        prepare(workdir, settings, shared + ours_only, cache=not args.no_cache, device=device)
        # 3. A and B interleaved, each in a fresh process.
        if in_process:
            os.environ.update(env)
        results = run_rounds(settings, workdir, shared, ours_only, device, env, in_process, keep=bool(args.workdir))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    # 4. Medians, the ratio, FLOP/s and MFU.
    summary: dict[str, Any] = {"settings": settings.__dict__, "machine": machine, "commit": commit, "command": command,
                               "sides": sides, "unet_training_flops_per_image": flops_per_image}
    rows = []
    for side in SIDES:
        rates = [r["images_per_s"] for r in results[side]]
        images_per_s = median(rates)
        achieved = images_per_s * flops_per_image
        summary[side] = {
            "images_per_s": images_per_s, "per_round": rates,
            "peak_memory": max(r["peak_memory"] for r in results[side]),
            "flops_per_s": achieved, "mfu": achieved / peak if peak else None,
        }
        rows.append([
            side, f"{images_per_s:.2f}", spread(rates), format_bytes(summary[side]["peak_memory"]),
            format_flops(achieved), f"{100 * achieved / peak:.1f}%" if peak else "n/a",
        ])
    summary["ratio"] = ratio(summary["ours"]["images_per_s"], summary["recipe"]["images_per_s"])
    summary["per_round_ratios"] = paired_ratios(summary["ours"]["per_round"], summary["recipe"]["per_round"])
    summary["per_round_ratio_median"] = median(summary["per_round_ratios"])
    rows.append(["ratio ours / recipe", f"{summary['ratio']:.2f}x (of the medians)",
                 f"per round {spread(summary['per_round_ratios'])}, median {summary['per_round_ratio_median']:.2f}x",
                 "", "", ""])

    memory_kind = "CUDA max_memory_allocated" if device.startswith("cuda") else "peak RSS of the process"
    report = Report(
        title=f"train_throughput, preset {'quick (tiny)' if args.quick else args.preset}, {settings.resolution} px, {device}",
        machine=machine, commit=commit, command=command,
        settings=[
            ("Setting", f"{settings.config_file or 'config defaults'} with model {settings.model}, {settings.resolution} px, "
                        f"batch {settings.batch_size}, mixed precision "
                        f"{settings.mixed_precision}, {settings.num_samples} shapes images, {settings.rounds} rounds x "
                        f"({settings.warmup_steps} warm-up + {settings.steps} timed steps), A/B interleaved"
                        + (", in one process" if in_process else ", one process per run")
                        + (f"; for both sides {' '.join((*settings.overrides, *args.override))}"
                           if settings.overrides or args.override else "")),
            ("ours", sides["ours"]),
            ("recipe", sides["recipe"]),
            ("FLOPs", f"U-Net forward {flops_per_image / TRAINING_FLOPS_PER_FORWARD / 1e9:.3g} GFLOP per image "
                      f"(FlopCounterMode); a training step counted as {TRAINING_FLOPS_PER_FORWARD} forward passes; "
                      + (f"peak {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "MFU n/a (no bf16 peak for this device)")),
        ],
        header=["side", "images/s (median)", "per-round range", f"peak memory ({memory_kind})", "U-Net FLOP/s", "MFU"],
        rows=rows,
        notes=list(args.note),
    )
    report.publish(args.record, args.json, summary)
    print(f"ratio (ours / recipe): {summary['ratio']:.2f}x of the medians, "
          f"{summary['per_round_ratio_median']:.2f}x median of the per-round ratios")
    return summary


if __name__ == "__main__":
    main()
