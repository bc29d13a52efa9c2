#!/usr/bin/env python
"""Kill a training run with SIGKILL at random moments, resume it each time, compare with a straight run.

    python scripts/kill_resume_check.py --kills 3 --seed 7            # stage 2 (train_ldm.py), tiny config
    python scripts/kill_resume_check.py --script training/train_vae.py

The by-hand counterpart of ``tests/test_training.py::test_resume_after_sigkill_is_exact``: the test
kills once, shortly after a chosen checkpoint; this kills ``--kills`` times at moments drawn
uniformly over the run's wall time (so also while a checkpoint is being written, or before the
first one), resumes with ``resume=latest`` after each kill, and prints the largest difference
between the final weights of the interrupted run and of an uninterrupted run of the same length and
seed. Exit status 1 when it is above ``--tolerance``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every safetensors tensor of the exported model folder(s) (``pipeline/`` or ``vae/``)."""
    weights = {}
    for file in sorted(output_dir.glob("pipeline/*/*.safetensors")) + sorted(output_dir.glob("vae/*.safetensors")):
        weights.update({f"{file.parent.name}.{key}": value for key, value in load_file(file).items()})
    if not weights:
        raise SystemExit(f"no exported weights under {output_dir}")
    return weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default="training/train_ldm.py")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*",
                        default=["train.max_steps=24", "train.checkpointing_steps=2", "vae_train.max_steps=24",
                                 "vae_train.checkpointing_steps=2", "data.shapes.num_samples=80",
                                 "train.caption_dropout=0.2", "diffusion.noise_offset=0.05"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def command(output_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / args.script), "--config", str(ROOT / args.config),
                f"output_dir={output_dir}", *args.overrides, *extra]

    straight = workdir / "straight"
    if "train_ldm" in args.script:  # both runs train on one stage-1 autoencoder
        subprocess.run([sys.executable, str(ROOT / "training/train_vae.py"), "--config", str(ROOT / args.config),
                        f"output_dir={workdir / 'stage1'}", *args.overrides], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        args.overrides.append(f"model.vae.pretrained={workdir / 'stage1' / 'vae'}")
    start = time.time()
    subprocess.run(command(straight), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    duration = time.time() - start
    print(f"uninterrupted run: {duration:.1f} s")

    interrupted = workdir / "interrupted"
    for kill in range(args.kills):
        extra = ("resume=latest",) if kill else ()
        process = subprocess.Popen(command(interrupted, *extra), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # most of a short run's wall time is start-up (imports, data): aim the kills at its second half
        delay = rng.uniform(0.45, 0.95) * duration
        time.sleep(delay)
        if process.poll() is not None:
            print(f"kill {kill + 1}: the run had already ended after {delay:.1f} s; not killed")
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        folder = interrupted / ("vae_stage" if "train_vae" in args.script else "") / "checkpoints"
        checkpoints = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        print(f"kill {kill + 1}: SIGKILL after {delay:.1f} s; checkpoint folder holds {checkpoints}")
    subprocess.run(command(interrupted, "resume=latest"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected, actual = final_weights(straight), final_weights(interrupted)
    if expected.keys() != actual.keys():
        print("the two runs exported different tensors")
        return 1
    worst = max((expected[k].float() - actual[k].float()).abs().max().item() for k in expected)
    print(f"{len(expected)} tensors; largest difference after {args.kills} kills and resumes: {worst:.3g}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
