"""The loop's plumbing that both training scripts share: Accelerate set-up, batch arithmetic, the data
loader and its epochs, logging set-up, images to the trackers, and the full model for sampling and saving.

The training loops themselves stay in ``training/train_vae.py`` and ``training/train_ldm.py`` and
read top to bottom; what lives here is what both need, or what would hide the loop's shape.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from PIL import Image

from ..config import Config, ConfigError, MixedPrecision
from .checkpointing import TrainingFailure

logger = logging.getLogger("latentdiff")


def make_accelerator(
    config: Config,
    mixed_precision: MixedPrecision,
    gradient_accumulation_steps: int,
    report_to: str | None,
    logging_subdir: str,
    find_unused_parameters: bool = False,
) -> Accelerator:
    """An ``Accelerator`` with a seedable data order (the same shuffle on resume) and the trackers of
    ``report_to`` (see :func:`check_report_to`). ``find_unused_parameters``: some steps leave part of the
    model without gradient (DistributedDataParallel otherwise stops at the next step).

    Raises:
        ConfigError: ``report_to`` names a tracker whose package is not installed (Accelerate would
            silently log nothing).
    """
    log_with = check_report_to(report_to)
    # Several processes on a machine without a GPU: Accelerate's MULTI_GPU launcher starts them, but
    # without a CUDA device each would fall back to a lone, non-distributed process. cpu=True makes
    # them one process group on the gloo backend (MULTI_CPU), as torchrun-launched CPU runs expect.
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_processes = several_processes and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs", logging_subdir)
        ),
        # Shuffle with seed + epoch, so the order of an epoch does not depend on when the run started.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None,
    )
    if cpu_processes and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _use_fsdp_on_cpu(accelerator)
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16":
        use_math_attention_on_cpu()
    return accelerator


def use_math_attention_on_cpu() -> None:
    """Run this process's CPU attention (``scaled_dot_product_attention``) with torch's math kernel, not its CPU
    flash-attention kernel: for a training run under bf16 autocast on CPU.

    Why: at a small latent U-Net's short sequences (64 and 16 positions in the shapes default's) the flash kernel's
    bf16 backward is many times slower than its float32 one, and so slow that bf16 training on CPU lost to float32
    (docs/conditioning.md, twenty-sixth round). On the shapes default's U-Net step (batch 64, a 2-core Xeon with AMX, torch 2.14.1) it
    took 280 of 890 ms in a profile of three bf16 steps, against 23 ms in float32; with the math kernel the
    bf16 step is about 1.3 times cheaper than the float32 one (``bench/stage2_step_cost.py --variant ""
    --variant "train.mixed_precision=bf16"``, docs/conditioning.md, forty-seventh round). The switch is the one
    ``torch.nn.attention.sdpa_kernel`` sets, which CPU dispatch reads as well as CUDA's (its name says CUDA);
    it is process-wide, as the training scripts' precision is.
    """
    torch.backends.cuda.enable_flash_sdp(False)


def replicate_under_fsdp_launch() -> bool:
    """Make the ``Accelerator`` created next replicate its model on every process (DDP) even under an FSDP
    launch, and say whether the launch asked for FSDP.

    For stage 1 and the text stage: their models are small enough to replicate, and Accelerate's FSDP 2
    could not shard them anyway. It prepares one model per ``prepare`` call (stage 1 may add a
    discriminator), and the launch's wrap policy names the U-Net's blocks (``BasicTransformerBlock``), which
    neither the autoencoder nor the text stage's ``CLIPModel`` has ("Could not find the transformer layer
    class"). So a user whose Accelerate config uses FSDP can still run every stage with one launch command.
    Accelerate reads the launch's choice from ``ACCELERATE_USE_FSDP`` when the ``Accelerator`` is built, so
    this must run first.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return True


def _use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn an FSDP launch on CPU processes (gloo) into FSDP, as on GPUs.

    Accelerate enables FSDP only for GPU-like process groups: on CPU processes it would silently
    train plain data-parallel instead. PyTorch's FSDP2 (``fully_shard``) does run on gloo, so the
    state Accelerate keeps for the run is set to FSDP here, with the plugin built from the launch's
    ``FSDP_*`` settings, exactly as Accelerate does for GPUs. This makes a CPU-only machine run (and
    test) the FSDP code path: sharded parameters, sharded checkpoints, gathered exports.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not hasattr(torch.cpu.Stream, "record_event"):  # FSDP 2's all-gather records an event on the stream
        raise ConfigError(
            f"FSDP on CPU processes needs a torch whose FSDP 2 runs on CPU (torch.cpu.Stream.record_event); "
            f"torch {torch.__version__} has none: use a newer torch, or a GPU"
        )
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes needs FSDP 2 (fsdp_version: 2 in the accelerate config)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def run_training_script(main: Callable[[], None], name: str) -> None:
    """Run a training script's ``main`` and report what went wrong in one line, not a traceback.

    Exit status 2: the input is wrong (a config value, a path, data, a model, a checkpoint to
    resume); 1: training stopped on a failure it detected (a non-finite loss, a checkpoint that
    could not be written). Any other exception is a bug and keeps its traceback.
    """
    try:
        main()
    except (ConfigError, OSError, TrainingFailure) as error:
        print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        if getattr(error, "raised_on_every_process", False):
            # The launcher (torchrun) stops every other process as soon as one exits with an error,
            # so a process that is a moment behind would die before it reports. A failure raised on
            # every process at once waits here until each one has printed its line.
            PartialState().wait_for_everyone()
        sys.exit(1 if isinstance(error, TrainingFailure) else 2)


def check_report_to(report_to: str | None) -> str | None:
    """The ``log_with`` argument of ``Accelerator`` for a ``report_to`` setting (``None`` for ``none``).

    ``tensorboard``, ``wandb`` or any other tracker name Accelerate knows, ``all`` (every installed
    tracker) or ``none``. Accelerate itself drops a named tracker whose package is not installed with
    only a debug message; a run the user asked to record must not go unrecorded, so that is an error
    here, before training starts.
    """
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    if report_to in (None, "none"):
        return None
    known = [str(kind) for kind in LoggerType]
    if report_to not in known:
        raise ConfigError(f"report_to={report_to!r} is not a tracker; expected one of {', '.join(known)} or none")
    if report_to != "all" and report_to not in [str(kind) for kind in get_available_trackers()]:
        raise ConfigError(
            f"report_to={report_to!r}: the {report_to} package is not installed (for wandb: pip install "
            "'latentdiff[wandb]'); install it, or choose another tracker or none"
        )
    return report_to


def tracker_hyperparameters(config: Config) -> dict[str, bool | int | float | str]:
    """The whole resolved configuration as one flat mapping of dotted keys (``train.max_steps``, the
    spelling of command-line overrides) to scalars, as trackers take hyperparameters.

    Accelerate's trackers accept only ``bool``, ``int``, ``float`` and ``str`` values (TensorBoard's
    ``add_hparams`` rejects lists and silently skips ``None``), so lists are written as YAML flow
    text (``[32, 64, 64]``) and ``None`` as ``null``, the way they are written in ``config.yaml``.
    """
    import yaml

    from ..config import config_to_dict

    flat: dict[str, bool | int | float | str] = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        elif value is None:
            flat[prefix[:-1]] = "null"
        elif isinstance(value, list):
            flat[prefix[:-1]] = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
        else:
            flat[prefix[:-1]] = value

    visit("", config_to_dict(config))
    return flat


def init_trackers(accelerator: Accelerator, project_name: str, config: Config) -> None:
    """Start the run's trackers (main process) with the whole configuration as hyperparameters."""
    if accelerator.is_main_process:
        accelerator.init_trackers(project_name, config=tracker_hyperparameters(config))


def per_process_batch_size(batch_size: int, num_processes: int, gradient_accumulation_steps: int, key: str) -> int:
    """Images each process feeds per forward pass, from the images per optimizer step.

    Raises:
        ValueError: ``batch_size`` does not divide evenly among processes and accumulation steps.
    """
    share = num_processes * gradient_accumulation_steps
    if batch_size < 1 or batch_size % share:
        raise ConfigError(
            f"{key}={batch_size} does not divide among {num_processes} process(es) x {gradient_accumulation_steps} "
            f"gradient accumulation step(s); use a multiple of {share} (e.g. {max(share, batch_size - batch_size % share)})"
        )
    return batch_size // share


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1], shape (N, C, H, W), as PIL images."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def log_images(accelerator: Accelerator, tag: str, grid: Image.Image, step: int) -> None:
    """Send an image grid to every active tracker that records images, through its ``log_images``
    (Accelerate's tracker API: TensorBoard, wandb, Aim, ClearML, SwanLab; others have none)."""
    pixels = np.asarray(grid.convert("RGB"))
    for tracker in accelerator.trackers:
        if not callable(getattr(tracker, "log_images", None)):
            continue
        if tracker.name == "tensorboard":
            # `SummaryWriter.add_images` takes one batched array, channels first unless told otherwise.
            tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({tag: [pixels]}, step=step)


def setup_logging(accelerator: Accelerator) -> None:
    """INFO logs on the main process only; libraries' warnings stay visible."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    import datasets
    import diffusers
    import transformers

    if accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def make_train_dataloader(dataset, batch_size: int, collate_fn, num_workers: int, accelerator: Accelerator):
    """The training DataLoader, prepared by Accelerate for map-style data.

    A streamed dataset (:class:`~latentdiff.data.loading.IterableImageTextDataset`) already splits its
    examples among processes and workers itself, so Accelerate must not shard it again: its loader is
    returned unprepared, and :func:`epoch_batches` moves its batches to the device.
    """
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not streaming,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        drop_last=True,
    )
    return loader if streaming else accelerator.prepare(loader)


def epoch_batches(accelerator: Accelerator, loader, dataset, epoch: int, skip_batches: int = 0):
    """The batches of ``epoch``, on the device, after the first ``skip_batches`` (to resume mid-epoch).

    The data order and every random choice in the data depend only on (seed, epoch, position), so the
    batches after a resume are those an uninterrupted run would have seen.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.set_epoch(epoch, start_batch=skip_batches)  # skips without decoding
        for batch in loader:
            yield {key: value.to(accelerator.device, non_blocking=True) if torch.is_tensor(value) else value
                   for key, value in batch.items()}
        return
    loader.set_epoch(epoch)
    dataset.set_epoch(epoch)  # Accelerate sets the sampler's epoch only, not the dataset's
    yield from accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader


def batch_size_of(batch: dict) -> int:
    return len(batch["captions"])


def full_model(accelerator: Accelerator, model):
    """``model`` with its full weights, on the main process, for sampling and saving (else ``None``).

    Under FSDP each process holds a shard of every weight: the full state dict is gathered (a
    collective call: every process must call this) into a fresh, unsharded copy. Otherwise the
    unwrapped model already holds the full weights and is returned as is.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    sharded = accelerator.unwrap_model(model)
    config = sharded.config
    plain = type(sharded).from_config(config) if hasattr(type(sharded), "from_config") else type(sharded)(config)
    plain.load_state_dict(state)
    return plain.to(accelerator.device)
