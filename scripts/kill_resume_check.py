#!/usr/bin/env python
"""Fault campaign: kill training runs with SIGKILL at random moments, resume each, compare with an
uninterrupted run.

    OMP_NUM_THREADS=1 python scripts/kill_resume_check.py --kills 20 --seed 7 --record   # the campaign
    python scripts/kill_resume_check.py --scenarios stage2 --kills 3                     # one scenario

Scenarios (the kills are dealt out among the chosen ones in turn): ``stage1`` (training/train_vae.py),
``stage2`` (training/train_ldm.py on a stage-1 autoencoder) and ``stage2-2proc`` (the same on two
processes, ``configs/accelerate/cpu-2proc.yaml``). For each scenario, one uninterrupted run gives the
reference weights, its wall time T and the moment S its first checkpoint began to be written
(before S a short run is mostly start-up, and a kill there only restarts it). Each kill is a trial
of its own: a fresh run is killed (the whole process tree, launcher included, as by the OOM killer or
a lost machine) after a delay drawn uniformly from [S, 0.95 T], so kills land in training steps, in
checkpoint writes and between them. Then every published checkpoint is verified
(:func:`latentdiff.trainer.checkpointing.verify_checkpoint`), the run is resumed with ``resume=latest`` to
its end, and its exported weights are compared with the reference.

Reported per scenario: kills, kills that interrupted a checkpoint write (a ``.partial-`` folder was
left), the largest absolute difference of any exported weight, unusable checkpoints (published but
failing verification, or a resume that failed). ``--record`` appends the table to bench/RESULTS.md
(part "Fault campaign"). Exit status 1 when a difference is above ``--tolerance`` or a checkpoint
was unusable. ``tests/test_training.py::test_resume_after_sigkill_is_exact`` is the quick version:
one kill, shortly after a chosen checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import Report, command_line, git_commit, machine_info  # noqa: E402

from latentdiff.trainer.checkpointing import PARTIAL_PREFIX, list_checkpoints, verify_checkpoint  # noqa: E402

SCENARIOS = ("stage1", "stage2", "stage2-2proc")
DEFAULT_OVERRIDES = [
    "train.max_steps=24", "train.checkpointing_steps=2", "vae_train.max_steps=24", "vae_train.checkpointing_steps=2",
    "data.shapes.num_samples=80",  # 5 batches per epoch: runs cross epochs and resume mid-epoch
    "train.caption_dropout=0.2", "diffusion.noise_offset=0.05", "sample.images_per_prompt=1",
]


@dataclass
class Trial:
    delay: float
    killed: bool
    newest_checkpoint: str
    partial: bool
    unusable: list[str] = field(default_factory=list)
    difference: float | None = None
    resume_failed: str | None = None


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every safetensors tensor of the exported model folder(s) (``pipeline/`` or ``vae/``)."""
    weights = {}
    for file in sorted(output_dir.glob("pipeline/*/*.safetensors")) + sorted(output_dir.glob("vae/*.safetensors")):
        weights.update({f"{file.parent.name}.{key}": value for key, value in load_file(file).items()})
    if not weights:
        raise SystemExit(f"no exported weights under {output_dir}")
    return weights


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants, one right after the other: the training processes
    of a multi-process launch run in sessions of their own, so a process group would miss them."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for member in [*tree, psutil.Process(process.pid)]:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(tree, timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Scenario:
    def __init__(self, name: str, args: argparse.Namespace, workdir: Path, stage1_vae: Path | None):
        self.name, self.args, self.workdir = name, args, workdir
        self.script = ROOT / ("training/train_vae.py" if name == "stage1" else "training/train_ldm.py")
        self.overrides = list(args.overrides) + ([f"model.vae.pretrained={stage1_vae}"] if stage1_vae else [])
        self.checkpoints = Path("vae_stage", "checkpoints") if name == "stage1" else Path("checkpoints")

    def command(self, output_dir: Path, *extra: str) -> list[str]:
        launcher = [sys.executable]
        if self.name == "stage2-2proc":
            launcher += ["-m", "accelerate.commands.launch", "--config_file",
                         str(ROOT / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", str(free_port())]
        return [*launcher, str(self.script), "--config", str(ROOT / self.args.config), f"output_dir={output_dir}",
                *self.overrides, *extra]

    def run(self, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(output_dir, *extra), env=ENV, capture_output=True, text=True, cwd=ROOT)

    def reference_run(self, output_dir: Path) -> tuple[float, float]:
        """The uninterrupted run: its wall time T and the moment S its first checkpoint folder appeared."""
        folder = output_dir / self.checkpoints
        with tempfile.TemporaryFile("w+") as stderr:
            start = time.time()
            process = subprocess.Popen(self.command(output_dir), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            first_checkpoint = None
            while process.poll() is None:
                if first_checkpoint is None and folder.is_dir() and any(folder.iterdir()):
                    first_checkpoint = time.time() - start
                time.sleep(0.05)
            duration = time.time() - start
            if process.returncode:
                stderr.seek(0)
                raise SystemExit(f"{self.name}: the uninterrupted run failed:\n{stderr.read()[-3000:]}")
        if first_checkpoint is None:
            raise SystemExit(f"{self.name}: the uninterrupted run wrote no checkpoint; lower train.checkpointing_steps")
        return duration, first_checkpoint

    def trial(self, output_dir: Path, delay: float, reference: dict[str, torch.Tensor]) -> Trial:
        process = subprocess.Popen(self.command(output_dir), env=ENV, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            kill_tree(process)
            killed = True
        folder = output_dir / self.checkpoints
        published = list_checkpoints(str(folder.parent))
        trial = Trial(
            delay=delay, killed=killed, newest_checkpoint=Path(published[-1][1]).name if published else "none",
            partial=folder.is_dir() and any(p.name.startswith(PARTIAL_PREFIX) for p in folder.iterdir()),
        )
        trial.unusable = [f"{Path(path).name}: {problem}" for _, path in published
                          if (problem := verify_checkpoint(path)) is not None]
        resumed = self.run(output_dir, "resume=latest")
        if resumed.returncode != 0:
            trial.resume_failed = (resumed.stderr.strip().splitlines() or ["(no output)"])[-1]
            return trial
        actual = final_weights(output_dir)
        if actual.keys() != reference.keys():
            trial.resume_failed = "the resumed run exported other tensors than the reference"
            return trial
        trial.difference = max((reference[k].float() - actual[k].float()).abs().max().item() for k in reference)
        return trial


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
ENV.pop("WORLD_SIZE", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--kills", type=int, default=20, help="kills in all, dealt out among the scenarios in turn")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--record", nargs="?", const=str(ROOT / "bench" / "RESULTS.md"), default=None,
                        help="append the table to bench/RESULTS.md (or the file given)")
    parser.add_argument("overrides", nargs="*", default=DEFAULT_OVERRIDES, help="config overrides for every run")
    args = parser.parse_args()
    if args.kills < 1:
        parser.error(f"--kills must be at least 1, got {args.kills}")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    kills = {name: len(range(index, args.kills, len(args.scenarios))) for index, name in enumerate(args.scenarios)}
    info = machine_info("cpu")
    started = time.time()

    stage1_vae = None
    if any(name != "stage1" for name in args.scenarios):  # stage 2 trains on one stage-1 autoencoder
        result = Scenario("stage1", args, workdir, None).run(workdir / "stage1-for-stage2")
        if result.returncode:
            raise SystemExit(f"stage 1 for the stage-2 scenarios failed:\n{result.stderr[-3000:]}")
        stage1_vae = workdir / "stage1-for-stage2" / "vae"

    rows, notes, failed, all_differences = [], [], False, []
    totals = {"kills": 0, "partial": 0, "unusable": 0}
    for name in args.scenarios:
        scenario = Scenario(name, args, workdir, stage1_vae if name != "stage1" else None)
        duration, first_checkpoint = scenario.reference_run(workdir / f"{name}-reference")
        reference = final_weights(workdir / f"{name}-reference")
        print(f"{name}: uninterrupted run {duration:.1f} s, first checkpoint at {first_checkpoint:.1f} s")
        trials: list[Trial] = []
        attempts = 0
        while len([t for t in trials if t.killed]) < kills[name] and attempts < 3 * kills[name]:
            attempts += 1
            output_dir = workdir / f"{name}-trial-{attempts}"
            trial = scenario.trial(output_dir, rng.uniform(first_checkpoint, 0.95 * duration), reference)
            shutil.rmtree(output_dir, ignore_errors=True)
            trials.append(trial)
            print(f"{name}: {'SIGKILL' if trial.killed else 'not killed (the run had ended)'} after {trial.delay:.1f} s; "
                  f"newest checkpoint {trial.newest_checkpoint}{', a checkpoint being written' if trial.partial else ''}; "
                  f"unusable {trial.unusable or 'none'}; "
                  + (f"resume failed: {trial.resume_failed}" if trial.resume_failed else f"difference {trial.difference:.3g}"))
        killed = [t for t in trials if t.killed]
        differences = [t.difference for t in killed if t.difference is not None]
        worst = max(differences, default=float("nan"))
        unusable = sum(len(t.unusable) for t in killed) + sum(t.resume_failed is not None for t in killed)
        partial = sum(t.partial for t in killed)
        failed |= unusable > 0 or not differences or worst > args.tolerance or len(killed) < kills[name]
        rows.append([name, str(len(killed)), str(partial), f"{worst:.3g}", str(unusable), f"{first_checkpoint:.1f} s / {duration:.1f} s"])
        notes.append(f"{name}: kills at " + ", ".join(
            f"{t.delay:.1f} s ({t.newest_checkpoint}{', writing' if t.partial else ''})" for t in killed))
        totals["kills"] += len(killed)
        totals["partial"] += partial
        totals["unusable"] += unusable
        all_differences += differences
    rows.append(["all", str(totals["kills"]), str(totals["partial"]), f"{max(all_differences, default=float('nan')):.3g}",
                 str(totals["unusable"]), ""])
    notes.append(f"wall time of the campaign: {(time.time() - started) / 60:.1f} min; kill-moment seed {seed}")

    report = Report(
        title=f"kill_resume_check: {args.kills} SIGKILLs over {', '.join(args.scenarios)}",
        machine=info, commit=git_commit(), command=command_line(),
        settings=[
            ("Config", f"`{args.config}` with `{' '.join(args.overrides)}`"),
            ("Method", "each kill a fresh run killed (SIGKILL to the whole process tree) after a delay uniform in [S, 0.95 T], S and T "
                       "the moment of the first checkpoint and the wall time of the uninterrupted run, every published checkpoint verified (file list, sizes, "
                       "SHA-256), resumed with resume=latest to the end, exported weights compared with the "
                       "uninterrupted run's"),
        ],
        header=["scenario", "kills", "kills during a checkpoint write", "largest difference", "unusable checkpoints",
                "S / T (uninterrupted)"],
        rows=rows, notes=notes,
    )
    report.print()
    if args.record:
        report.append_to(args.record, part="Fault campaign")
        print(f"recorded in {args.record}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
