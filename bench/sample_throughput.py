#!/usr/bin/env python
"""Sampling throughput: ``LatentPipeline`` against ``diffusers.StableDiffusionPipeline``, side by side.

    python bench/sample_throughput.py --preset small                  # CPU, 64 px
    python bench/sample_throughput.py --preset sd15                   # GPU, 512 px, batch 1, bf16
    python bench/sample_throughput.py --preset sd15 --compile --channels-last

Both pipelines are built in this process on the same components (one VAE, text encoder and
tokenizer; one U-Net, copied for our side only when a switch changes it), each with its own
instance of the same scheduler, and called with the same prompt batch, steps, guidance scale, seed
and output type, A and B interleaved (A B, B A, ...) after warm-up calls. Reported per side, as medians
over the calls: U-Net iterations/s (denoising steps per second, timed inside the loop from the end
of the first step to the end of the last, the rate Diffusers' progress bar shows), images/s (whole
calls: prompt encoding, denoising, VAE decoding, post-processing), and the ratio A / B; the largest
pixel difference between the two sides' images of the first round shows that both did the same
work. The U-Net's achieved FLOP/s (forward FLOPs from ``FlopCounterMode``, on the doubled batch
under classifier-free guidance) and its share of the dense bf16 peak (n/a on CPU) are printed too.

Our side's switches (``--compile``, ``--channels-last``) are recorded with the figures.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    DEFAULT_RESULTS_FILE,
    PeakMemory,
    Report,
    bf16_peak_flops,
    check_device,
    command_line,
    format_bytes,
    format_flops,
    git_commit,
    interleaved,
    machine_info,
    median,
    paired_ratios,
    ratio,
    spread,
    synchronize,
    unet_forward_flops,
)

SIDES = ("ours", "diffusers")
PROMPT = "a red circle at the top left"


@dataclass(frozen=True)
class SamplePreset:
    model: str
    """``model.preset`` (:data:`latentdiff.models.MODEL_PRESETS`); weights are random (throughput only)."""
    resolution: int
    batch_size: int
    steps: int
    guidance_scale: float
    scheduler: str
    """A name of :mod:`latentdiff.models.schedulers` (``dpm`` = DPM-Solver++(2M))."""
    device: str
    dtype: str
    rounds: int
    warmup_calls: int
    threads: int | None = None
    """torch's CPU threads; None: torch's default."""


PRESETS: dict[str, SamplePreset] = {
    # One thread on a shared CPU: see the note on the `small` preset of train_throughput.py.
    "small": SamplePreset("small", 64, 1, 25, 4.0, "dpm", "cpu", "fp32", rounds=9, warmup_calls=1, threads=1),
    "sd15": SamplePreset("sd15", 512, 1, 50, 7.5, "dpm", "cuda", "bf16", rounds=5, warmup_calls=2),
}
QUICK = SamplePreset("tiny", 32, 1, 2, 4.0, "dpm", "cpu", "fp32", rounds=1, warmup_calls=1, threads=1)
"""``--quick``: the tiny test model, two steps, one round: a smoke test, not a figure."""

DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--quick", action="store_true", help="Tiny model, two steps, one round: a smoke test.")
    shared = parser.add_argument_group("both sides (defaults from the preset)")
    shared.add_argument("--model", help="model.preset (tiny, small, sd15, sd2), e.g. tiny for a dry run.")
    shared.add_argument("--resolution", type=int)
    shared.add_argument("--batch-size", type=int, help="Images per call (one prompt, repeated).")
    shared.add_argument("--steps", type=int, help="num_inference_steps (at least 2).")
    shared.add_argument("--guidance-scale", type=float, help="Classifier-free guidance weight (> 1 doubles the U-Net batch).")
    shared.add_argument("--scheduler", help="Sampler name: ddim, dpm, euler, euler_a, ddpm, pndm.")
    shared.add_argument("--device", help="cpu or cuda")
    shared.add_argument("--dtype", choices=DTYPES, help="Weights' dtype for both pipelines.")
    shared.add_argument("--rounds", type=int, help="Timed A B rounds (one call per side each).")
    shared.add_argument("--warmup-calls", type=int, help="Untimed calls per side first.")
    shared.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for small, torch's own for sd15).")
    ours = parser.add_argument_group("our pipeline's switches (recorded with the figures)")
    ours.add_argument("--compile", action="store_true", help="torch.compile our pipeline's U-Net.")
    ours.add_argument("--compile-mode", default="reduce-overhead",
                      help="torch.compile mode (default reduce-overhead: CUDA graphs on a GPU).")
    ours.add_argument("--compile-backend", default="inductor",
                      help="torch.compile backend (default inductor; eager traces the graph and generates no code, "
                           "for a quick check of the compiled path on a CPU).")
    ours.add_argument("--channels-last", action="store_true", help="Our U-Net in channels_last memory format.")
    output = parser.add_argument_group("output")
    output.add_argument("--peak-tflops", type=float, help="Dense bf16 peak of the device (default: by GPU name).")
    output.add_argument("--record", nargs="?", const=DEFAULT_RESULTS_FILE, metavar="RESULTS_MD",
                        help="Append the result as a section of bench/RESULTS.md (or the file given).")
    output.add_argument("--json", metavar="PATH", help="Also write the figures as JSON.")
    output.add_argument("--note", action="append", default=[], help="A note recorded with the figures.")
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> SamplePreset:
    """The preset with the command line's values over it; checked before any heavy work."""
    from latentdiff.models.schedulers import SCHEDULER_NAMES

    preset = QUICK if args.quick else PRESETS[args.preset]
    values = {
        "model": args.model, "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "scheduler": args.scheduler, "device": args.device,
        "dtype": args.dtype, "rounds": args.rounds, "warmup_calls": args.warmup_calls, "threads": args.threads,
    }
    settings = replace(preset, **{key: value for key, value in values.items() if value is not None})
    for name in ("resolution", "batch_size", "rounds"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.steps < 2:
        raise SystemExit(f"--steps must be at least 2 (the loop is timed from the end of step 1), got {settings.steps}")
    if settings.warmup_calls < 0:
        raise SystemExit(f"--warmup-calls must be 0 or more, got {settings.warmup_calls}")
    if settings.threads is not None and settings.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {settings.threads}")
    if settings.scheduler not in SCHEDULER_NAMES:
        raise SystemExit(f"--scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got {settings.scheduler!r}")
    return settings


def build_pipelines(settings: SamplePreset, args: argparse.Namespace, device: str):
    """``(ours, diffusers, unet_flops_per_iteration)`` on one set of seeded random components."""
    import torch
    from diffusers import StableDiffusionPipeline

    from latentdiff.config import load_config
    from latentdiff.diffusion import make_noise_scheduler
    from latentdiff.models import build_components, vae_scale_factor
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.models.schedulers import scheduler_from_name

    config = load_config(None, [f"model.preset={settings.model}", f"data.resolution={settings.resolution}"])
    factor = vae_scale_factor(config.model)
    if settings.resolution % factor:
        raise SystemExit(f"--resolution {settings.resolution} is not a multiple of the autoencoder's factor {factor}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.dtype]
    torch.manual_seed(0)
    components = build_components(config.model, settings.resolution)
    for name in ("vae", "text_encoder", "unet"):
        components[name].requires_grad_(False).eval().to(device, dtype=dtype)
    noise_config = make_noise_scheduler(config.diffusion).config

    our_unet = components["unet"]
    if args.channels_last or args.compile:
        our_unet = copy.deepcopy(our_unet)  # the switches must not touch the Diffusers side's U-Net
    if args.channels_last:
        our_unet.to(memory_format=torch.channels_last)
    if args.compile:
        # A mode is Inductor's: other backends take none.
        mode = args.compile_mode if args.compile_backend == "inductor" else None
        our_unet = torch.compile(our_unet, backend=args.compile_backend, mode=mode)
    shared = {name: components[name] for name in ("vae", "text_encoder", "tokenizer")}
    ours = LatentPipeline(**shared, unet=our_unet, scheduler=scheduler_from_name(settings.scheduler, noise_config))
    theirs = StableDiffusionPipeline(
        **shared, unet=components["unet"], scheduler=scheduler_from_name(settings.scheduler, noise_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    unet_batch = settings.batch_size * (2 if settings.guidance_scale > 1 else 1)
    flops = unet_forward_flops(config.model, settings.resolution // factor, unet_batch)
    return ours, theirs, flops


def timed_call(pipeline, settings: SamplePreset, device: str) -> dict[str, Any]:
    """One pipeline call: its duration, the U-Net loop's rate, the images and (CUDA) peak memory."""
    import torch

    stamps: list[float] = []

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        # Only the first and the last step synchronize, so the loop keeps its asynchrony in between.
        if step == 0 or step == pipe.num_timesteps - 1:
            synchronize(device)
            stamps.append(time.perf_counter())
        return {}

    memory = PeakMemory(device)
    if device.startswith("cuda"):
        memory.start()
    synchronize(device)
    start = time.perf_counter()
    images = pipeline(
        [PROMPT] * settings.batch_size,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        callback_on_step_end=on_step_end,
    ).images
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "images_per_s": settings.batch_size / seconds,
        "unet_it_per_s": (settings.steps - 1) / (stamps[-1] - stamps[0]),
        "peak_memory": memory.peak_until() if device.startswith("cuda") else None,
        "images": images,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    # 1. Check the settings against the machine before any heavy work.
    settings = resolve_settings(args)
    device = check_device(settings.device)
    import numpy as np
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    machine = machine_info(device)
    commit, command = git_commit(), command_line()

    # 2. Both pipelines on the same components.
    ours, theirs, flops_per_iteration = build_pipelines(settings, args, device)
    pipelines = {"ours": ours, "diffusers": theirs}
    peak = bf16_peak_flops(device, args.peak_tflops)
    switches = [name for name, on in (("torch.compile", args.compile), ("channels_last", args.channels_last)) if on]
    sides = {
        "ours": "latentdiff LatentPipeline" + (f" with {', '.join(switches)}" if switches else ""),
        "diffusers": "diffusers StableDiffusionPipeline (safety checker off)",
    }
    if args.compile:
        sides["ours"] += (f" (mode {args.compile_mode})" if args.compile_backend == "inductor"
                          else f" (backend {args.compile_backend})")

    # 3. Warm-up calls, then timed calls, A and B alternating.
    from tqdm.auto import tqdm

    for _, side in tqdm(interleaved(settings.warmup_calls, SIDES) if settings.warmup_calls else [], desc="warm-up"):
        timed_call(pipelines[side], settings, device)
    calls: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for round_index, side in tqdm(interleaved(settings.rounds, SIDES), desc="A/B calls"):
        result = timed_call(pipelines[side], settings, device)
        if round_index > 0:
            result.pop("images")
        calls[side].append(result)
    difference = float(np.abs(calls["ours"][0].pop("images") - calls["diffusers"][0].pop("images")).max())

    # 4. Medians, the ratio, FLOP/s.
    summary: dict[str, Any] = {"settings": settings.__dict__, "machine": machine, "commit": commit, "command": command,
                               "sides": sides, "unet_flops_per_iteration": flops_per_iteration,
                               "max_abs_pixel_difference": difference}
    rows = []
    for side in SIDES:
        iterations = [c["unet_it_per_s"] for c in calls[side]]
        images = [c["images_per_s"] for c in calls[side]]
        memory = [c["peak_memory"] for c in calls[side] if c["peak_memory"] is not None]
        achieved = median(iterations) * flops_per_iteration
        summary[side] = {
            "unet_it_per_s": median(iterations), "images_per_s": median(images),
            "per_call_unet_it_per_s": iterations, "per_call_images_per_s": images,
            "peak_memory": max(memory) if memory else None,
            "unet_flops_per_s": achieved, "unet_mfu": achieved / peak if peak else None,
        }
        rows.append([
            side, f"{median(iterations):.2f}", spread(iterations), f"{median(images):.3f}", spread(images),
            format_bytes(summary[side]["peak_memory"]), format_flops(achieved),
            f"{100 * achieved / peak:.1f}%" if peak else "n/a",
        ])
    summary["ratio_unet_it_per_s"] = ratio(summary["ours"]["unet_it_per_s"], summary["diffusers"]["unet_it_per_s"])
    summary["ratio_images_per_s"] = ratio(summary["ours"]["images_per_s"], summary["diffusers"]["images_per_s"])
    for figure in ("unet_it_per_s", "images_per_s"):
        per_round = paired_ratios(summary["ours"][f"per_call_{figure}"], summary["diffusers"][f"per_call_{figure}"])
        summary[f"per_round_ratios_{figure}"] = per_round
        summary[f"per_round_ratio_median_{figure}"] = median(per_round)
    rows.append([
        "ratio ours / diffusers", f"{summary['ratio_unet_it_per_s']:.2f}x",
        f"per round {spread(summary['per_round_ratios_unet_it_per_s'])}, "
        f"median {summary['per_round_ratio_median_unet_it_per_s']:.2f}x",
        f"{summary['ratio_images_per_s']:.2f}x",
        f"per round {spread(summary['per_round_ratios_images_per_s'])}, "
        f"median {summary['per_round_ratio_median_images_per_s']:.2f}x",
        "", "", "",
    ])

    report = Report(
        title=f"sample_throughput, preset {'quick (tiny)' if args.quick else args.preset}, {settings.resolution} px, {device}",
        machine=machine, commit=commit, command=command,
        settings=[
            ("Setting", f"model {settings.model} (random weights), {settings.resolution} px, batch {settings.batch_size}, "
                        f"{settings.steps} steps of {settings.scheduler}, guidance {settings.guidance_scale}, "
                        f"{settings.dtype}, {settings.warmup_calls} warm-up + {settings.rounds} timed calls per side, "
                        "A/B interleaved, output_type np"),
            ("ours", sides["ours"]),
            ("diffusers", sides["diffusers"]),
            ("Same work", f"largest pixel difference between the two sides' first images: {difference:.2e} (of 1)"),
            ("FLOPs", f"U-Net forward {flops_per_iteration / 1e9:.3g} GFLOP per iteration (FlopCounterMode, batch "
                      f"{settings.batch_size * (2 if settings.guidance_scale > 1 else 1)} with guidance); "
                      + (f"peak {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "MFU n/a (no bf16 peak for this device)")),
        ],
        header=["side", "U-Net it/s (median)", "range", "images/s (median)", "range", "peak memory (CUDA)",
                "U-Net FLOP/s", "U-Net MFU"],
        rows=rows,
        notes=list(args.note),
    )
    report.publish(args.record, args.json, summary)
    print(f"ratio (ours / diffusers): U-Net it/s {summary['ratio_unet_it_per_s']:.2f}x, "
          f"images/s {summary['ratio_images_per_s']:.2f}x")
    return summary


if __name__ == "__main__":
    main()
