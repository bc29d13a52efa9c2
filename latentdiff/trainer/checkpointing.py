"""Atomic training checkpoints on top of Accelerate's ``save_state`` / ``load_state``.

Accelerate writes a checkpoint's files one by one into the folder it is given; a process killed in
the middle leaves a half-written folder that a later ``load_state`` would fail on. Its automatic
naming (``ProjectConfiguration(automatic_checkpoint_naming=True)``) has the same gap. So each
checkpoint is written into a hidden temporary folder and renamed into place only when complete:
``rename`` is atomic on POSIX file systems, so ``checkpoints/checkpoint-<step>`` either exists whole
or not at all, and ``resume=latest`` only ever sees complete checkpoints.

Layout::

    <output_dir>/checkpoints/checkpoint-500/      model, optimizer, scheduler, EMA, RNG states
                                                  (Accelerate's files) + training_state.json
    <output_dir>/checkpoints/.partial-checkpoint-1000/   being written; ignored, removed on resume
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

from accelerate import Accelerator

from .rng import TrainingRNG

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
STATE_FILE = "training_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainingState:
    """Loop counters saved with each checkpoint (the rest of the state is Accelerate's)."""

    global_step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """The epoch in progress."""
    epoch_batches: int = 0
    """Batches (per process, micro-batches under gradient accumulation) of that epoch already used."""
    images_seen: int = 0
    skipped_images: int = 0
    """Images that failed to decode and were skipped so far."""


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint folder to resume from: ``None``, ``"latest"`` or an explicit path.

    ``latest`` with no checkpoint yet starts from scratch (so the same command both starts and
    continues a run). An explicit path that is not a complete checkpoint is an error.
    """
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(
            f"resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE} in it); "
            f"use resume=latest or one of: {[path for _, path in list_checkpoints(output_dir)] or 'none yet'}"
        )
    return resume


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    state: TrainingState,
    total_limit: int | None,
    rng: TrainingRNG | None = None,
) -> str:
    """Save the full training state atomically as ``checkpoint-<global_step>``; keep ``total_limit``.

    Saves Accelerate's state (models, optimizer, LR scheduler, registered objects such as the EMA,
    the data sampler and every process's global RNG states), each process's :class:`TrainingRNG`
    and the loop counters. Must be called on every process.
    """
    folder = checkpoints_dir(output_dir)
    final = os.path.join(folder, f"{CHECKPOINT_PREFIX}{state.global_step}")
    partial = os.path.join(folder, f"{PARTIAL_PREFIX}{CHECKPOINT_PREFIX}{state.global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    if rng is not None:
        rng.save(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(os.path.join(partial, STATE_FILE), asdict(state))
        _fsync_tree(partial)
        if os.path.exists(final):  # the same step saved twice (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(folder)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str, rng: TrainingRNG | None = None) -> TrainingState:
    """Restore everything ``save_checkpoint`` saved; return the loop counters."""
    accelerator.load_state(path)
    if rng is not None:
        rng.load(path)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as file:
        return TrainingState(**json.load(file))


def remove_partial_checkpoints(output_dir: str) -> None:
    """Delete folders left by a process killed while writing a checkpoint."""
    folder = checkpoints_dir(output_dir)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _write_json_atomic(path: str, data: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` to disk before the rename publishes it (power-loss safety)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
