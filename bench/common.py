"""Helpers the benchmark scripts share: machine and commit description, peak memory, FLOP counting,
medians and ratios, worker subprocesses, and the Markdown sections written to ``bench/RESULTS.md``.

Benchmarks are scripts, never timed tests: they compare our code (A) with Diffusers' own recipe (B)
side by side in one run, A and B interleaved (A B, B A, A B, ...), and report the ratio A / B of the medians.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (the parent of ``bench/``)."""

DEFAULT_RESULTS_FILE = os.path.join(REPO_ROOT, "bench", "RESULTS.md")

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s. The H200 has
# the H100 SXM's compute (it differs in memory), so both are taken as 989 TFLOP/s. Matched in order
# against `torch.cuda.get_device_name()`: the more specific names first.
BF16_DENSE_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)


# --------------------------------------------------------------------------------------------
# The machine, the commit, the command
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What the figures depend on: CPU, cores, load, library versions, the accelerator."""
    import diffusers
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: ``Intel Xeon ..., 2 cores (2 torch threads), load 1.8/2.4/2.0, torch 2.x, device cpu``."""
    load = "/".join(f"{x:.2f}" for x in info["load_average"])
    text = (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), load average {load} at start; "
        f"Python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}; device {info['device']}"
    )
    if "gpu" in info:
        text += f" ({info['gpu']}, CUDA {info['cuda']})"
    return text


COMMIT_ENV = "LATENTDIFF_BENCH_COMMIT"
"""Set by ``bench/gpu.py`` on a machine that received the repository's files without ``.git``: the
commit those files were checked against (``bench/gpu.py`` compares them with the stamp that
``bench/gpu.py wheels`` wrote)."""


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the repository, with a note when the working tree differs
    (outside a git checkout: :data:`COMMIT_ENV` if set)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        status = [line for line in git("status", "--porcelain").splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not status:
        return commit
    modified = sum(1 for line in status if not line.startswith("??"))
    untracked = len(status) - modified
    return f"{commit} + uncommitted changes ({modified} modified, {untracked} untracked paths)"


def command_line() -> str:
    """The command that is running, as it could be typed again from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    return shlex.join(["python", script, *sys.argv[1:]])


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of this process while it is "open": resident set size, or CUDA's allocator peak.

    On CPU a thread samples the resident set size (``psutil``) every ``interval`` seconds, because
    ``ru_maxrss`` is a lifetime maximum and cannot leave out the start-up or the end of a run; a
    sample can be kept or dropped by its time stamp (:meth:`peak_until`). On CUDA the figure is
    ``torch.cuda.max_memory_allocated`` since :meth:`start` (tensors only, not the CUDA context).
    """

    def __init__(self, device: str, interval: float = 0.05):
        self.device = device
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "CUDA max_memory_allocated" if self.device.startswith("cuda") else "peak RSS"

    def start(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
            return self
        import psutil

        process = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.samples.append((time.time(), process.memory_info().rss))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def peak_until(self, wall_time: float | None = None) -> int:
        """Peak bytes; on CPU only the samples taken before ``wall_time`` (``time.time()``) count."""
        if self.device.startswith("cuda"):
            import torch

            return int(torch.cuda.max_memory_allocated(torch.device(self.device)))
        kept = [rss for stamp, rss in self.samples if wall_time is None or stamp <= wall_time]
        return max(kept) if kept else 0


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock reading means something."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


# --------------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------------


def unet_forward_flops(model_config, sample_size: int, batch_size: int) -> int:
    """FLOPs of one U-Net forward pass on ``batch_size`` latents, counted on the meta device.

    ``torch.utils.flop_counter.FlopCounterMode`` counts matrix multiplications and convolutions
    (2 FLOPs per multiply-add; attention through its batched matmuls) and nothing elementwise, the
    usual convention for model FLOPs (Chowdhery et al. 2022, "PaLM", App. B). On the meta device
    no memory is allocated and nothing is computed, so an SD-sized U-Net is counted in seconds.
    """
    return int(_counted_unet_forward(model_config, sample_size, batch_size).get_total_flops())


def unet_forward_flops_by_block(model_config, sample_size: int, batch_size: int) -> dict[str, float]:
    """Each top-level block's share (``down_blocks.0``, ..., ``mid_block``, ``up_blocks.N``) of the FLOPs of
    :func:`unet_forward_flops`; the rest (``conv_in``, ``conv_out``, the time embedding) is left out."""
    counts = _counted_unet_forward(model_config, sample_size, batch_size).get_flop_counts()
    prefix = "UNet2DConditionModel."
    total = sum(counts["UNet2DConditionModel"].values())
    blocks = [module for module in counts if module == prefix + "mid_block"
              or module.startswith((prefix + "down_blocks.", prefix + "up_blocks.")) and module.count(".") == 2]
    return {module[len(prefix):]: sum(counts[module].values()) / total for module in blocks}


def _counted_unet_forward(model_config, sample_size: int, batch_size: int):
    """A ``FlopCounterMode`` (two levels of modules deep) that counted one forward of the config's U-Net on the
    meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiff.models import build_unet

    with torch.device("meta"):
        unet = build_unet(model_config, sample_size=sample_size)
        latents = torch.zeros(batch_size, unet.config.in_channels, sample_size, sample_size)
        timesteps = torch.zeros(batch_size, dtype=torch.long)
        text = torch.zeros(
            batch_size, model_config.text_encoder.max_position_embeddings, unet.config.cross_attention_dim
        )
        with FlopCounterMode(display=False, depth=2) as counter:
            unet(latents, timesteps, text)
    return counter


TRAINING_FLOPS_PER_FORWARD = 3
"""A training step costs about 3 forward passes: the forward, and a backward of twice its FLOPs
(gradients with respect to activations and to weights; Kaplan et al. 2020, Sec. 2.1)."""


def bf16_peak_flops(device: str, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops`` if given, else from the GPU name
    (:data:`BF16_DENSE_PEAK_FLOPS`); ``None`` on CPU or for an unknown GPU (MFU is then n/a)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in BF16_DENSE_PEAK_FLOPS:
        if key in name:
            return peak
    return None


def format_flops(flops_per_second: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_second >= scale:
            return f"{flops_per_second / scale:.2f} {unit}"
    return f"{flops_per_second / 1e6:.2f} MFLOP/s"


def format_bytes(num_bytes: int | None) -> str:
    if not num_bytes:
        return "n/a"
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no measurement to take the median of")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the per-round figures, to show the noise next to a median."""
    return f"{min(values):.3g}-{max(values):.3g}" if values else "n/a"


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else float("nan")


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """``ours[i] / theirs[i]``: the ratio within each round, whose two runs were back to back.

    On a machine whose load changes from minute to minute, the median of these is steadier than
    the ratio of the two medians, which may come from different rounds.
    """
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} figures for our side but {len(theirs)} for the other")
    return [ratio(a, b) for a, b in zip(ours, theirs)]


def interleaved(rounds: int, sides: Sequence[str] = ("ours", "recipe")) -> list[tuple[int, str]]:
    """The run order ``[(0, A), (0, B), (1, B), (1, A), (2, A), (2, B), ...]``.

    A and B alternate, so that a change in the machine's load during the run falls on both sides
    alike, and the side that goes first alternates from round to round (A B B A A B ...), so that
    neither side always runs right after the other (warm caches, a just-freed allocator).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    order = list(sides)
    return [(index, side) for index in range(rounds) for side in (order if index % 2 == 0 else order[::-1])]


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


def run_worker(script: str, role: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <script> --worker <role> --spec <file>`` and return the JSON it writes.

    One fresh process per measurement: each side's peak memory is its own, and neither inherits the
    other's allocator state or warm caches.

    Raises:
        RuntimeError: the worker failed; the message holds the end of its output.
    """
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as folder:
        spec_path, result_path = os.path.join(folder, "spec.json"), os.path.join(folder, "result.json")
        with open(spec_path, "w", encoding="utf-8") as file:
            json.dump({**spec, "result_path": result_path}, file)
        process = subprocess.run(
            [sys.executable, script, "--worker", role, "--spec", spec_path],
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if process.returncode != 0 or not os.path.isfile(result_path):
            tail = "\n".join(process.stdout.splitlines()[-40:])
            raise RuntimeError(f"the {role!r} worker failed (exit code {process.returncode}):\n{tail}")
        with open(result_path, encoding="utf-8") as file:
            return json.load(file)


def write_worker_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    with open(spec["result_path"], "w", encoding="utf-8") as file:
        json.dump(result, file)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    """One benchmark run, printed to the terminal and optionally appended to ``bench/RESULTS.md``."""

    title: str
    machine: dict[str, Any]
    commit: str
    command: str
    settings: list[tuple[str, str]]
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))

    def markdown(self) -> str:
        lines = [
            f"### {self.title} ({self.date})",
            "",
            f"- Machine: {describe_machine(self.machine)}",
            f"- Commit: `{self.commit}`",
            f"- Command: `{self.command}`",
        ]
        lines += [f"- {name}: {value}" for name, value in self.settings]
        lines += ["", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        print()
        print(self.markdown())

    @property
    def part(self) -> str:
        """The part of ``bench/RESULTS.md`` this run belongs to: ``CPU`` or ``GPU`` (by its device)."""
        return "GPU" if str(self.machine.get("device", "cpu")).startswith("cuda") else "CPU"

    def append_to(self, path: str, part: str | None = None) -> None:
        """Add this run as the last section of the part ``## <part>`` of ``path`` (default :attr:`part`;
        a missing part is started at the end of the file). ``path`` must exist: it holds the format's
        header. The file is rewritten atomically (a new file renamed over it)."""
        append_sections(path, part or self.part, "\n" + self.markdown())

    def publish(self, record: str | None, json_path: str | None, summary: dict[str, Any]) -> None:
        """Print the report; append it to ``record`` (``--record``) and write ``summary`` to ``json_path``
        (``--json``) when given."""
        self.print()
        if record:
            self.append_to(record)
            print(f"recorded in {record}")
        if json_path:
            with open(json_path, "w", encoding="utf-8") as file:
                json.dump(summary, file, indent=2, default=str)


def _rewrite(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (a new file renamed over it)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def append_sections(path: str, part: str, sections: str) -> None:
    """Add ``sections`` (Markdown starting with a ``### `` heading) at the end of the part
    ``## <part>`` of the results file ``path``; a missing part is started at the end of the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--record: no results file at {path!r}; create it with its header first")
    with open(path, encoding="utf-8") as file:
        text = file.read()
    heading = re.search(rf"^## {re.escape(part)}$", text, flags=re.MULTILINE)
    if heading is None:
        text = text.rstrip("\n") + f"\n\n## {part}\n" + sections
    else:
        next_part = re.search(r"^## ", text[heading.end():], flags=re.MULTILINE)
        end = len(text) if next_part is None else heading.end() + next_part.start()
        text = text[:end].rstrip("\n") + "\n" + sections + ("\n" + text[end:] if end < len(text) else "")
    _rewrite(path, text)


def results_parts(path: str) -> list[tuple[str, str]]:
    """``(part, sections)`` for each ``## <part>`` of a results file that holds ``### `` sections, in
    file order: the text from the part's first section heading to the part's end, unchanged."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    headings = list(re.finditer(r"^## (.+)$", text, flags=re.MULTILINE))
    parts = []
    for index, heading in enumerate(headings):
        end = headings[index + 1].start() if index + 1 < len(headings) else len(text)
        body = text[heading.end():end]
        first = re.search(r"^### ", body, flags=re.MULTILINE)
        if first is not None:
            parts.append((heading.group(1).strip(), "\n" + body[first.start():].strip("\n") + "\n"))
    return parts


def take_in(results_file: str, into: str = DEFAULT_RESULTS_FILE) -> list[str]:
    """Append every section of ``results_file`` (a file that ``--record`` wrote, e.g. by
    ``bench/gpu.sh`` on another machine) to the same part of ``into``, unchanged; return the parts.

    Raises:
        ValueError: ``results_file`` holds no ``### `` section under a ``## `` part.
    """
    parts = results_parts(results_file)
    if not parts:
        raise ValueError(f"{results_file!r} holds no '### ' section under a '## ' part: nothing to take in")
    for part, sections in parts:
        append_sections(into, part, sections)
    return [part for part, _ in parts]


def logged_scalars(log_folder: str, tag: str) -> list[tuple[int, float, float]]:
    """``(step, value, wall_time)`` of every ``tag`` scalar in the tensorboard events under ``log_folder``."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in glob.glob(os.path.join(log_folder, "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            events += [(event.step, event.value, event.wall_time) for event in accumulator.Scalars(tag)]
    return sorted(events)


def check_device(device: str) -> str:
    """``cpu`` or ``cuda[:N]``, checked against the machine before any heavy work."""
    import torch

    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: no CUDA device on this machine; use --device cpu (or --preset small)")
        return device
    raise SystemExit(f"--device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")



def held_scenes(pipeline, model: str, images: int):
    """``(scheduler, latents, captions)`` for probing a trained pipeline folder: its DDPM training schedule, and
    ``images`` held scenes of the run's own data (config.yaml beside the folder; the defaults otherwise), each
    with its full description, encoded by the pipeline's VAE (posterior mean)."""
    import torch
    from diffusers import DDPMScheduler

    from latentdiff.config import load_config
    from latentdiff.trainer.encoding import encode_images
    from latentdiff.trainer.probes import held_examples

    # the run's config (data options), saved next to the pipeline folder by the trainer
    run_config = os.path.join(os.path.dirname(os.path.normpath(model)), "config.yaml")
    config = load_config(run_config) if os.path.isfile(run_config) else load_config()
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    pixels, captions = held_examples(config.data, config.seed, images)
    with torch.no_grad():
        latents = encode_images(pipeline.vae, pixels, None, mean=True).float()
    return scheduler, latents, captions
