"""Atomic, verified training checkpoints on top of Accelerate's ``save_state`` / ``load_state``.

Accelerate writes a checkpoint's files one by one into the folder it is given; a process killed in
the middle leaves a half-written folder that a later ``load_state`` would fail on. Its automatic
naming (``ProjectConfiguration(automatic_checkpoint_naming=True)``) has the same gap, and nothing in
Accelerate notices a file damaged after it was written. So:

* each checkpoint is written into a hidden temporary folder and renamed into place only when
  complete: ``rename`` is atomic on POSIX file systems, so ``checkpoints/checkpoint-<step>`` either
  exists whole or not at all;
* ``training_state.json``, written last, lists every file of the checkpoint with its size and
  SHA-256; ``resume=latest`` verifies the newest checkpoint against it and, when a file is missing,
  truncated or altered, sets the folder aside (``.damaged-checkpoint-<step>``) with a warning and
  falls back to the previous complete one;
* a failure to write (a full disk) is reported on every process, in one line, and leaves the older
  checkpoints as they were;
* what latentdiff itself adds to a checkpoint is safetensors or JSON, never pickle: the EMA weights
  (``ema.safetensors``, or one ``ema_<process>.safetensors`` per process when FSDP shards them, and
  ``ema.json``), each process's training RNG (``training_rng_<process>.safetensors``) and the loop
  counters. Accelerate's own ``optimizer.bin``, ``scheduler.bin`` and ``random_states_<process>.pkl``
  stay pickle; Accelerate reads them with ``torch.load(weights_only=True)``.

Layout::

    <output_dir>/checkpoints/checkpoint-500/            model*.safetensors, optimizer.bin, scheduler.bin,
                                                        random_states_*.pkl (Accelerate's), ema.*,
                                                        training_rng_*.safetensors, training_state.json
    <output_dir>/checkpoints/.partial-checkpoint-1000/  being written; ignored, removed on resume
    <output_dir>/checkpoints/.damaged-checkpoint-1000/  failed verification; kept for inspection
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from .rng import TrainingRNG

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

logger = logging.getLogger("latentdiff")

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
DAMAGED_PREFIX = ".damaged-"
REMOVING_PREFIX = ".removing-"
STATE_FILE = "training_state.json"
EMA_CONFIG_FILE = "ema.json"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class TrainingFailure(RuntimeError):
    """Training stopped on a failure it detected itself; reported in one line, not as a traceback."""


class CheckpointWriteError(TrainingFailure):
    """A checkpoint could not be written (e.g. a full disk); the older checkpoints are untouched.
    Raised on every process at once (see ``_stop_if_any_failed``)."""

    raised_on_every_process = True


class NonFiniteLossError(TrainingFailure):
    """The training loss (or a weight) became NaN or infinite. Raised on every process at once
    (see ``NonFiniteLossGuard``)."""

    raised_on_every_process = True


class DamagedCheckpointError(OSError):
    """The checkpoint to resume from is damaged, and there is no complete one to fall back to."""


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
    """Complete checkpoints as ``(step, path)``, oldest first (complete: the state file was written)."""
    folder = checkpoints_dir(output_dir)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Verification and resume
# --------------------------------------------------------------------------------------------


def verify_checkpoint(path: str) -> str | None:
    """What is wrong with the checkpoint folder ``path``, or ``None`` if it is intact.

    Intact: its state file reads, and every file it lists is present with the size and SHA-256
    recorded when the checkpoint was written. (A checkpoint from before the file list existed is
    taken as it is.)
    """
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} cannot be read ({error})"
    files = data.get("files") if isinstance(data, dict) else None
    if files is None:
        return None
    for name, recorded in sorted(files.items()):
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            return f"{name} is missing"
        size = os.path.getsize(file_path)
        if size != recorded["bytes"]:
            return f"{name} has {size} bytes, {recorded['bytes']} were written"
        if _sha256(file_path) != recorded["sha256"]:
            return f"{name} is not the file that was written (SHA-256 differs)"
    return None


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint folder to resume from: ``None``, ``"latest"`` or an explicit path.

    ``latest`` takes the newest checkpoint that passes :func:`verify_checkpoint`; newer, damaged
    ones are renamed to ``.damaged-checkpoint-<step>`` with a warning that names them and what is
    wrong. ``latest`` with no checkpoint yet starts from scratch (so the same command both starts
    and continues a run). Call it on one process (see :func:`find_resume_checkpoint`).

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
        DamagedCheckpointError: an explicit path that is damaged, or ``latest`` when every
            checkpoint is damaged (then nothing is renamed).
    """
    if resume is None:
        return None
    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise FileNotFoundError(
                f"resume={resume!r} is not a complete checkpoint folder (no {STATE_FILE} in it); "
                f"use resume=latest or one of: {[path for _, path in list_checkpoints(output_dir)] or 'none yet'}"
            )
        problem = verify_checkpoint(resume)
        if problem:
            raise DamagedCheckpointError(f"resume={resume!r}: the checkpoint is damaged: {problem}")
        return resume
    damaged: list[tuple[str, str]] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, why in damaged:
                aside = os.path.join(os.path.dirname(bad), DAMAGED_PREFIX + os.path.basename(bad))
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
                logger.warning("checkpoint %s is damaged (%s): moved it to %s; resuming from %s", bad, why, aside, path)
            return path
        damaged.append((path, problem))
    if damaged:
        details = "; ".join(f"{os.path.basename(path)}: {why}" for path, why in damaged)
        raise DamagedCheckpointError(
            f"every checkpoint under {checkpoints_dir(output_dir)} is damaged ({details}); move them away "
            "to start over, or restore an intact copy"
        )
    return None


def find_resume_checkpoint(accelerator: Accelerator, output_dir: str, resume: str | None) -> str | None:
    """:func:`resolve_resume` on the main process (after removing half-written checkpoints), its
    answer or its error shared with every process. Must be called on every process."""
    answer: list[Any] = [None, None]
    if accelerator.is_main_process:
        remove_partial_checkpoints(output_dir)
        try:
            answer = [resolve_resume(output_dir, resume), None]
        except (OSError, ValueError) as error:
            answer = [None, (type(error).__name__, str(error))]
    broadcast_object_list(answer)
    path, error = answer
    if error is not None:
        kind, message = error
        raise (FileNotFoundError if kind == "FileNotFoundError" else DamagedCheckpointError)(message)
    return path


def remove_partial_checkpoints(output_dir: str) -> None:
    """Delete folders left by a process killed while writing a checkpoint or deleting an old one."""
    folder = checkpoints_dir(output_dir)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith((PARTIAL_PREFIX, REMOVING_PREFIX)):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    state: TrainingState,
    total_limit: int | None,
    rng: TrainingRNG | None = None,
    ema: EMAModel | None = None,
) -> str:
    """Save the full training state atomically as ``checkpoint-<global_step>``; keep ``total_limit``.

    Saves Accelerate's state (models, optimizer, LR scheduler, the data sampler and every process's
    global RNG states), the EMA, each process's :class:`TrainingRNG`, the loop counters and the list
    of files with their sizes and SHA-256. Must be called on every process.

    Raises:
        CheckpointWriteError: on every process, when any process failed to write its part (e.g. the
            disk is full); the partial folder is removed and older checkpoints stay as they were.
    """
    folder = checkpoints_dir(output_dir)
    final = os.path.join(folder, f"{CHECKPOINT_PREFIX}{state.global_step}")
    partial = os.path.join(folder, f"{PARTIAL_PREFIX}{CHECKPOINT_PREFIX}{state.global_step}")
    error: OSError | None = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        except OSError as caught:
            error = caught
    _stop_if_any_failed(accelerator, error, final, partial)
    try:
        accelerator.save_state(partial)
        if rng is not None:
            rng.save(partial)
        if ema is not None:
            _save_ema(accelerator, ema, partial)
    except OSError as caught:
        error = caught
    _stop_if_any_failed(accelerator, error, final, partial)
    if accelerator.is_main_process:
        try:
            files = {name: _describe_file(os.path.join(partial, name)) for name in _relative_files(partial)}
            _write_json_atomic(os.path.join(partial, STATE_FILE), {**asdict(state), "files": files})
            _fsync_dir(partial)
            if os.path.exists(final):  # the same step saved twice (e.g. final save after a periodic one)
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(folder)
        except OSError as caught:
            error = caught
    _stop_if_any_failed(accelerator, error, final, partial)
    if accelerator.is_main_process and total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            # Renamed out of sight first: a process killed while deleting leaves a hidden folder (removed
            # at the next start), not a published checkpoint with some of its files gone.
            removing = os.path.join(os.path.dirname(old), REMOVING_PREFIX + os.path.basename(old))
            shutil.rmtree(removing, ignore_errors=True)
            os.replace(old, removing)
            shutil.rmtree(removing, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator, path: str, rng: TrainingRNG | None = None, ema: EMAModel | None = None
) -> TrainingState:
    """Restore everything ``save_checkpoint`` saved; return the loop counters."""
    accelerator.load_state(path)
    if rng is not None:
        rng.load(path)
    if ema is not None:
        _load_ema(accelerator, ema, path)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as file:
        data = json.load(file)
    return TrainingState(**{f.name: data[f.name] for f in fields(TrainingState) if f.name in data})


def _stop_if_any_failed(accelerator: Accelerator, error: OSError | None, final: str, partial: str) -> None:
    """Share each process's write error with all (a collective call): every process raises the
    same one-line error, none is left waiting for the others."""
    errors = gather_object([None if error is None else str(error)])
    failed = [(index, message) for index, message in enumerate(errors) if message is not None]
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    index, message = failed[0]
    where = f" (process {index})" if accelerator.num_processes > 1 else ""
    raise CheckpointWriteError(
        f"could not write checkpoint {final}{where}: {message}; the older checkpoints are unchanged "
        "(free some space, then resume=latest continues from the newest)"
    )


# --------------------------------------------------------------------------------------------
# The EMA, as safetensors and JSON
# --------------------------------------------------------------------------------------------


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 ``DTensor`` (a view of it: writing
    into it writes into the parameter), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _ema_is_sharded(accelerator: Accelerator) -> bool:
    """Under FSDP each process's EMA holds the average of its own shards (see train_ldm.py)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _ema_weights_file(accelerator: Accelerator) -> str:
    return f"ema_{accelerator.process_index}.safetensors" if _ema_is_sharded(accelerator) else "ema.safetensors"


def _save_ema(accelerator: Accelerator, ema: EMAModel, folder: str) -> None:
    """The EMA's averaged weights as safetensors (one file per process when FSDP shards them), its
    counters and settings as JSON. ``accelerator.register_for_checkpointing`` would pickle it all
    (``custom_checkpoint_0.pkl``, loaded by Accelerate with ``weights_only=False``)."""
    if _ema_is_sharded(accelerator) or accelerator.is_main_process:
        tensors = {f"shadow_params.{i}": t.detach().cpu().contiguous() for i, t in enumerate(ema.shadow_params)}
        save_file(tensors, os.path.join(folder, _ema_weights_file(accelerator)))
    if accelerator.is_main_process:
        settings = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
        _write_json_atomic(os.path.join(folder, EMA_CONFIG_FILE), settings)


def _load_ema(accelerator: Accelerator, ema: EMAModel, folder: str) -> None:
    path = os.path.join(folder, _ema_weights_file(accelerator))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {folder!r} has no EMA weights ({os.path.basename(path)}); it was written by a run with "
            "train.use_ema=false, by a different number of processes or by an older latentdiff"
        )
    tensors = load_file(path)
    if len(tensors) != len(ema.shadow_params):
        raise ValueError(f"{path} holds {len(tensors)} EMA tensors; this model has {len(ema.shadow_params)}")
    with open(os.path.join(folder, EMA_CONFIG_FILE), encoding="utf-8") as file:
        ema.load_state_dict(json.load(file))  # counters and settings; the weights are copied in below
    with torch.no_grad():
        for index, shadow in enumerate(ema.shadow_params):
            shadow.copy_(tensors[f"shadow_params.{index}"])


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _relative_files(folder: str) -> list[str]:
    names = []
    for root, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(root, name), folder) for name in files]
    return sorted(names)


def _describe_file(path: str) -> dict[str, Any]:
    """Size and SHA-256 of a file, flushed to disk first (so that the rename publishes complete files)."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: str, data: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _fsync_dir(folder: str) -> None:
    for root, _, _ in os.walk(folder):
        descriptor = os.open(root, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim boolean tensor on the tensors' device: every element of every tensor is finite
    (this process's shards, for FSDP2 ``DTensor`` parameters). No host synchronisation."""
    flags = [torch.isfinite(local_tensor(t)).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


class NonFiniteLossGuard:
    """Notices a NaN or infinite training loss without a host-device synchronisation per step.

    :meth:`observe` keeps, on the device, the first step whose loss was not finite; :meth:`check`
    reads it back (one synchronisation, on every process) together with a finiteness test of the
    weights about to be saved. The training scripts check at each log interval and before every
    checkpoint, validation and export, so a run that diverged stops with the step named, and no
    checkpoint holds non-finite weights: the newest one written before stays the last good one.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.first_bad_step: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is not finite and no earlier step was (device-side only)."""
        bad = ~torch.isfinite(loss.detach()).all()
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def check(self, accelerator: Accelerator, step: int, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Raise :class:`NonFiniteLossError` on every process if any process saw a non-finite loss
        or holds a non-finite value in ``tensors``. A collective call."""
        device = accelerator.device
        first_bad = self.first_bad_step if self.first_bad_step is not None else torch.full((), -1, dtype=torch.long)
        local = torch.stack([first_bad.to(device), (~all_finite(tensors)).long().to(device)])
        flags = accelerator.gather(local).reshape(-1, 2).cpu()
        bad_steps = [s for s in flags[:, 0].tolist() if s >= 0]
        if bad_steps:
            what = f"the training loss was not finite (nan or inf) at step {min(bad_steps)}"
        elif bool(flags[:, 1].any()):
            what = f"the weights hold non-finite values (nan or inf) at step {step}"
        else:
            return
        newest = list_checkpoints(self.output_dir)
        last = f"the newest checkpoint, {newest[-1][1]}, is from before it" if newest else "no checkpoint was written"
        raise NonFiniteLossError(
            f"{what}; training stopped without saving that state ({last}; resume=latest continues from it, "
            "e.g. with a lower train.optimizer.learning_rate)"
        )
