#!/usr/bin/env python
"""Run a training script with one fault injected, for the tests:

    python tests/inject_fault.py --nan-loss-at-step 5 training/train_ldm.py --config configs/tiny.yaml ...
    accelerate launch ... tests/inject_fault.py --disk-full-at-checkpoint 6 --on-process 0 training/train_ldm.py ...

``--nan-loss-at-step N`` makes the training loss of optimizer step N a NaN (the loss function's
result is multiplied by NaN, so the NaN also flows through backward into the gradients and weights,
as a real divergence would). ``--disk-full-at-checkpoint N`` makes the first file write of
checkpoint N fail with ``OSError(ENOSPC)`` on the process(es) chosen by ``--on-process``.
``--late-process P`` makes process P raise a training failure two seconds after the others (as a
process slowed by a busy machine would), so that a test sees whether the launcher, which stops the
other processes once one exits with an error, cuts P off before it reports. The script then runs
unchanged, as ``__main__``.
"""

from __future__ import annotations

import argparse
import errno
import os
import runpy
import sys


def inject_nan_loss(step: int) -> None:
    """The ``step``-th call of the loss (one per optimizer step without gradient accumulation) returns NaN."""
    import latentdiff.trainer.autoencoder as autoencoder
    import latentdiff.diffusion as diffusion

    calls = {"diffusion": 0, "vae": 0}

    def diffusion_loss(*args, **kwargs):
        output = original_diffusion_loss(*args, **kwargs)
        calls["diffusion"] += 1
        if calls["diffusion"] == step:
            output.loss = output.loss * float("nan")
        return output

    def reconstruction_loss(*args, **kwargs):
        loss = original_reconstruction_loss(*args, **kwargs)
        calls["vae"] += 1
        return loss * float("nan") if calls["vae"] == step else loss

    original_diffusion_loss, original_reconstruction_loss = diffusion.diffusion_loss, autoencoder.reconstruction_loss
    diffusion.diffusion_loss, autoencoder.reconstruction_loss = diffusion_loss, reconstruction_loss


def inject_disk_full(step: int) -> None:
    """Writes into ``.partial-checkpoint-<step>`` fail as on a full disk (torch.save and safetensors)."""
    import safetensors.torch
    import torch

    marker = f".partial-checkpoint-{step}"

    def failing(original):
        def write(obj, path, *args, **kwargs):
            if marker in os.fspath(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
            return original(obj, path, *args, **kwargs)

        return write

    torch.save = failing(torch.save)
    safetensors.torch.save_file = failing(safetensors.torch.save_file)
    import accelerate.utils.other  # Accelerate binds safetensors' save_file at import

    accelerate.utils.other.safe_save_file = failing(accelerate.utils.other.safe_save_file)


def delay_training_failures(seconds: float) -> None:
    """Every :class:`TrainingFailure` takes ``seconds`` longer to raise on this process."""
    import time

    from latentdiff.trainer.checkpointing import TrainingFailure

    original_init = TrainingFailure.__init__

    def late_init(self, *args, **kwargs):
        time.sleep(seconds)
        original_init(self, *args, **kwargs)

    TrainingFailure.__init__ = late_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nan-loss-at-step", type=int, default=None)
    parser.add_argument("--disk-full-at-checkpoint", type=int, default=None)
    parser.add_argument("--on-process", type=int, default=None, help="only on this process (default: all)")
    parser.add_argument("--late-process", type=int, default=None, help="this process raises failures 2 s late")
    parser.add_argument("script", help="the training script; every argument after it is the script's")
    split = next(i for i, arg in enumerate(sys.argv[1:], 1) if arg.endswith(".py"))
    args = parser.parse_args(sys.argv[1 : split + 1])
    script_args = sys.argv[split + 1 :]
    here = args.on_process is None or int(os.environ.get("RANK", "0")) == args.on_process
    if here and args.nan_loss_at_step is not None:
        inject_nan_loss(args.nan_loss_at_step)
    if here and args.disk_full_at_checkpoint is not None:
        inject_disk_full(args.disk_full_at_checkpoint)
    if args.late_process is not None and int(os.environ.get("RANK", "0")) == args.late_process:
        delay_training_failures(2.0)
    sys.argv = [args.script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
