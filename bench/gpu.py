#!/usr/bin/env python
"""Every figure that needs a GPU, measured by one command in under 9 minutes: ``bash bench/gpu.sh``.

A GPU is lent to this project now and then, for about 15 minutes of machine time (start-up,
installs and idle time included), on a bare machine that has torch and accelerate but not
diffusers, datasets or open_clip_torch, and reaches no package registry. So the measurement is one
prepared command, and a dry run of the same plan on the CPU (tiny model, tiny sizes) is in the test
suite, so that it cannot rot between GPU runs:

    python bench/gpu.py wheels                   # here, first: what the GPU machine lacks, into .whl/
    bash bench/gpu.sh --out $OUT                 # there: install .whl/ and the project, run every part
    bash bench/gpu.sh --dry-run --out /tmp/dry   # here: the same plan on the CPU (tiny model and sizes)
    python bench/gpu.py merge gpu-results.md     # here, after: the run's sections into bench/RESULTS.md

The parts, in the order they run (each step a subprocess with its own time limit; all of them
inside the total budget, 540 s from the moment gpu.sh started; a step that fails or runs out of
time is reported, and the next one runs):

    env                  imports, versions, the GPU, the carried wheels' requirements
    (a) train-512/-256   bench/train_throughput.py --preset sd15 at 512 and 256 px, bf16: ours
                         against the recipe, images/s, peak memory, MFU
    (b) sample(-compiled) bench/sample_throughput.py --preset sd15, batch 1, 512 px: LatentPipeline
                         against StableDiffusionPipeline, plain and with the compiled U-Net
    (d) smoke-fsdp       a short stage-2 run under configs/accelerate/fsdp.yaml on one GPU; gpu-1.yaml
                         launches part (c)'s two training runs
    (c) long-vae, long-ldm, long-eval   configs/shapes-long.yaml shortened to minutes (stage 2 takes
                         the time that is left), then ``latentdiff eval`` on a reduced suite

Results, in ``--out`` (at most 8 files, as the device tool returns them): ``gpu-results.md`` (the
sections ``--record`` writes, in bench/RESULTS.md's format, taken in by ``merge``),
``gpu-summary.json``, ``gpu.log`` (every step's output), and the shapes-long run's images and eval.
bench/README.md ("GPU figures in one call") says how to run it, what each figure is compared with,
and how the time limits were sized.

This file imports only the standard library at the top (and ``bench/common.py``, which does too), so
that it runs, and reports, even where the project's dependencies are missing or broken.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (bench/ is a folder of scripts, not a package)
    COMMIT_ENV,
    DEFAULT_RESULTS_FILE,
    REPO_ROOT,
    Report,
    git_commit,
    logged_scalars,
    take_in,
)

TOTAL_BUDGET_S = 540.0
"""The whole call, from the start of gpu.sh (wheel installs included) to the last figure: 9 minutes,
inside the device tool's 10-minute limit per command and a 15-minute lease with the machine's start."""

WRAP_UP_S = 20.0
"""Kept back from the budget for the end: a step stopped at its limit gets 10 s to exit and 5 more
before it is killed, then the sections, the summary and the copies are written."""

WHEELS_DIR = os.path.join(REPO_ROOT, ".whl")
SOURCE_STAMP = "source.json"
"""Written into the wheel folder by ``wheels``: the commit and a hash of every tracked file, so that a
run on a machine that received the files without ``.git`` can still name its commit."""

RESULTS_NAME, SUMMARY_NAME, LOG_NAME = "gpu-results.md", "gpu-summary.json", "gpu.log"

TRAINING_TARGET_IMAGES_PER_S = 110.0
SAMPLING_TARGET_UNET_IT_PER_S = 110.0
"""The project's targets on an H100 or H200 (bench/README.md says what they are compared with)."""

# --------------------------------------------------------------------------------------------
# The packages the GPU machine lacks (bench/README.md, "The wheels")
# --------------------------------------------------------------------------------------------

MACHINE_PYTHON = "3.12"
MACHINE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
    torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
"""What the GPU machine's image holds (the device documentation's package list, read 2026-11-17)."""

MACHINE_VERSIONS = {
    "torch": "2.11.0", "accelerate": "1.15.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2", "torchvision": "0.26.0",
}
"""The versions of those that one session saw there (2026-11): checked against the carried wheels'
requirements here; the env step checks every version on the machine itself."""


@dataclass(frozen=True)
class Carried:
    name: str
    role: str
    """``imported`` (its requirements must all be on the machine or carried), ``data`` or ``build``."""
    why: str
    version: str | None = None
    """An exact version; None: the version installed in the environment that runs ``wheels`` (the
    project's, whose tests pass with it)."""
    spec: str = ""
    """A requirement instead of a version (``>=77``)."""
    unused_requirements: tuple[str, ...] = ()
    """Declared requirements that the GPU path never imports (each named in ``why``)."""


CARRIED = (
    Carried("diffusers", "imported", "models, pipelines, schedulers; it declares importlib_metadata, which it "
            "imports only on Python < 3.8", unused_requirements=("importlib-metadata",)),
    Carried("datasets", "imported", "the data path (shapes data, image folders); its pyarrow, pandas, xxhash "
            "and fsspec are on the machine"),
    Carried("dill", "imported", "a requirement of datasets"),
    Carried("multiprocess", "imported", "a requirement of datasets"),
    Carried("open_clip_torch", "data", "only its BPE vocabulary file, which latentdiff.models.tokenizer reads without "
            "importing open_clip (seconds, and timm and ftfy besides)"),
    Carried("setuptools", "build", "the build backend for installing this checkout: its pyproject.toml's SPDX "
            "license string needs setuptools >= 77, and the machine's version is not known; it vendors its "
            "own requirements", spec=">=77"),
)

MODULES_NEEDED = (
    "torch", "accelerate", "diffusers", "transformers", "datasets", "safetensors", "tensorboard", "scipy",
    "yaml", "PIL", "psutil", "latentdiff", "latentdiff.pipelines",
)
"""What the parts import; the env step imports each and reports where it came from."""


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# --------------------------------------------------------------------------------------------
# wheels: here, before a GPU session
# --------------------------------------------------------------------------------------------


def pip_download_command(destination: str, requirements: list[str], python_version: str) -> list[str]:
    """The device documentation's download: binary wheels only, no dependencies, for the machine's
    Python on x86-64 Linux."""
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64"]
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", python_version, "--implementation", "cp",
        *[argument for platform in platforms for argument in ("--platform", platform)],
        "-d", destination, *requirements,
    ]


def wheel_metadata(path: str) -> dict[str, Any]:
    """Name, version and ``Requires-Dist`` lines of a wheel file."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = archive.read(name).decode("utf-8")
    fields: dict[str, Any] = {"requires": []}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        if key == "Name":
            fields["name"] = value.strip()
        elif key == "Version":
            fields["version"] = value.strip()
        elif key == "Requires-Dist":
            fields["requires"].append(value.strip())
    return fields


def machine_marker_environment(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
        "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": "",
    }


def unmet_requirements(wheels: list[dict[str, Any]], carried: tuple[Carried, ...], python_version: str,
                       machine: frozenset[str] = MACHINE_PACKAGES,
                       machine_versions: dict[str, str] = MACHINE_VERSIONS) -> tuple[list[str], list[str]]:
    """``(missing, version_conflicts)``: what an ``imported`` carried wheel requires (for the machine's
    Python and platform, extras left out) that is neither carried nor on the machine, and requirements
    that a known machine version (or a carried one) does not satisfy."""
    from packaging.requirements import Requirement

    roles = {_normalize(c.name): c for c in carried}
    carried_versions = {_normalize(w["name"]): w["version"] for w in wheels}
    environment = machine_marker_environment(python_version)
    missing, conflicts = [], []
    for wheel in wheels:
        entry = roles.get(_normalize(wheel["name"]))
        if entry is None or entry.role != "imported":
            continue
        for line in wheel["requires"]:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = _normalize(requirement.name)
            if name in {_normalize(n) for n in entry.unused_requirements}:
                continue
            if name not in carried_versions and name not in machine:
                missing.append(f"{wheel['name']} needs {requirement} (neither on the machine nor carried)")
                continue
            version = carried_versions.get(name) or machine_versions.get(name)
            if version and requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
                where = "carried" if name in carried_versions else "on the machine"
                conflicts.append(f"{wheel['name']} needs {requirement}; {version} is {where}")
    return missing, conflicts


def tracked_files() -> list[str]:
    """The files that travel to the device machine: tracked ones, and untracked ones git does not ignore."""
    output = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout
    return sorted({path for path in output.decode().split("\0") if path and os.path.isfile(os.path.join(REPO_ROOT, path))})


def file_digest(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def source_stamp() -> dict[str, Any]:
    """The commit and a digest of every tracked file as it is now (uncommitted changes included)."""
    files = tracked_files()
    return {"commit": git_commit(), "files": {path: file_digest(os.path.join(REPO_ROOT, path)) for path in files}}


def command_wheels(args: argparse.Namespace) -> int:
    """Download the wheels the GPU machine lacks into ``--dest``, check that they are complete and
    that everything that travels fits the device tool's 64 MiB, and stamp the source."""
    from importlib import metadata

    destination = os.path.abspath(args.dest)
    requirements = []
    for entry in CARRIED:
        if entry.spec:
            requirements.append(entry.name + entry.spec)
            continue
        try:
            version = entry.version or metadata.version(entry.name)
        except metadata.PackageNotFoundError:
            print(f"gpu.py wheels: {entry.name} is not installed in this Python ({sys.executable}); run it with the "
                  "project's environment (source scripts/env.sh), whose versions the tests pass with", file=sys.stderr)
            return 2
        requirements.append(f"{entry.name}=={version}")
    os.makedirs(destination, exist_ok=True)
    for old in glob.glob(os.path.join(destination, "*.whl")):  # one version of each: two stop the install
        os.remove(old)
    command = pip_download_command(destination, requirements, args.python_version)
    print("$ " + shlex.join(command))
    if subprocess.run(command).returncode != 0:
        print("gpu.py wheels: pip could not download every wheel (see above)", file=sys.stderr)
        return 1

    wheels = [wheel_metadata(path) for path in sorted(glob.glob(os.path.join(destination, "*.whl")))]
    missing, conflicts = unmet_requirements(wheels, CARRIED, args.python_version)
    wheel_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(destination, "*.whl")))
    # Whatever else is in the folder travels with it too (e.g. a stage-1 autoencoder for --long-vae).
    other_bytes = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(destination)
                      for name in names if not name.endswith(".whl") and name != SOURCE_STAMP)
    stamp = source_stamp()
    tree_bytes = sum(os.path.getsize(os.path.join(REPO_ROOT, path)) for path in stamp["files"])
    with open(os.path.join(destination, SOURCE_STAMP), "w", encoding="utf-8") as file:
        json.dump(stamp, file)

    print(f"\n{len(wheels)} wheels in {destination} (for Python {args.python_version}, x86-64 Linux):")
    roles = {_normalize(c.name): c for c in CARRIED}
    for wheel in wheels:
        entry = roles[_normalize(wheel["name"])]
        print(f"  {wheel['name']} {wheel['version']} ({entry.role}): {entry.why}")
    limit = 64 * 2**20
    total = wheel_bytes + other_bytes + tree_bytes
    others = f" + other files in {os.path.basename(destination)}/ {other_bytes / 2**20:.1f} MiB" if other_bytes else ""
    print(f"size: wheels {wheel_bytes / 2**20:.1f} MiB{others} + the checkout's files {tree_bytes / 2**20:.1f} MiB "
          f"(tracked, and untracked ones git does not ignore) = {total / 2**20:.1f} MiB of the device tool's "
          f"{limit // 2**20} MiB")
    print(f"source stamp: commit {stamp['commit']}, {len(stamp['files'])} files")
    for conflict in conflicts:
        print(f"warning: {conflict}")
    for line in missing:
        print(f"error: {line}", file=sys.stderr)
    if total > limit:
        print("error: more than the device tool carries", file=sys.stderr)
    return 1 if missing or total > limit else 0


# --------------------------------------------------------------------------------------------
# env: the first step on the GPU machine
# --------------------------------------------------------------------------------------------


def command_env(args: argparse.Namespace) -> int:
    """Import what the parts need, report versions and the GPU, check the carried wheels'
    requirements against what is installed; write it all as JSON."""
    import importlib
    from importlib import metadata

    report: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {},
                              "errors": [], "warnings": []}
    for name in MODULES_NEEDED:
        try:
            module = importlib.import_module(name)
            report["modules"][name] = {"version": getattr(module, "__version__", ""),
                                       "file": getattr(module, "__file__", "")}
        except Exception as error:  # noqa: BLE001 - every failure is reported, none is fatal here
            report["errors"].append(f"import {name}: {type(error).__name__}: {error}")
    try:
        from latentdiff import clip_tokenizer

        report["clip_tokenizer_vocabulary"] = len(clip_tokenizer())
        if "open_clip" in sys.modules:
            report["warnings"].append("open_clip was imported: the GPU path should only read its vocabulary file")
    except Exception as error:  # noqa: BLE001
        report["errors"].append(f"CLIP vocabulary: {type(error).__name__}: {error}")

    from packaging.requirements import Requirement

    for path in sorted(glob.glob(os.path.join(args.wheels, "*.whl"))):
        wheel = wheel_metadata(path)
        entry = next((c for c in CARRIED if _normalize(c.name) == _normalize(wheel["name"])), None)
        if entry is None or entry.role != "imported":
            continue
        for line in wheel["requires"]:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            if _normalize(requirement.name) in {_normalize(n) for n in entry.unused_requirements}:
                continue
            try:
                installed = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                report["errors"].append(f"{wheel['name']} needs {requirement}: not installed")
                continue
            if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
                report["warnings"].append(f"{wheel['name']} {wheel['version']} needs {requirement}; {installed} is installed")

    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = "cuda"
            properties = torch.cuda.get_device_properties(0)
            report["gpu"] = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
                             "capability": f"{properties.major}.{properties.minor}",
                             "multiprocessors": properties.multi_processor_count, "cuda": torch.version.cuda}
    except Exception as error:  # noqa: BLE001
        report["errors"].append(f"torch: {type(error).__name__}: {error}")
    report["device"] = device
    try:
        from common import bf16_peak_flops, machine_info

        report["machine"] = machine_info(device)
        peak = bf16_peak_flops(device)
        report["bf16_peak_tflops"] = peak / 1e12 if peak else None
    except Exception as error:  # noqa: BLE001
        report["errors"].append(f"machine description: {type(error).__name__}: {error}")

    with open(args.json, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1, default=str)
    for name, module in report["modules"].items():
        print(f"{name:<22} {module['version']:<14} {module['file']}")
    print(f"device: {device} {report.get('gpu', '')}")
    for line in report["warnings"]:
        print(f"warning: {line}")
    for line in report["errors"]:
        print(f"error: {line}")
    return 1 if report["errors"] else 0


# --------------------------------------------------------------------------------------------
# The plan: what runs, with which sizes and time limits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: for a GPU machine, or tiny for the dry run on a CPU. The arguments are
    appended to each command's own, so the dry run runs the same commands with smaller numbers."""

    budget_s: float
    limits: dict[str, tuple[float, float]]
    """Per step: (time limit, the least time worth starting it with), in seconds."""
    train: tuple[str, ...]
    train_512: tuple[str, ...]
    train_256: tuple[str, ...]
    sample: tuple[str, ...]
    sample_compiled: tuple[str, ...]
    smoke: tuple[str, ...]
    long_vae: tuple[str, ...]
    long_ldm: tuple[str, ...]
    long_vae_steps: int
    long_ldm_steps_per_s: float
    """Stage 2's speed assumed when its step count is sized to the time left (a low estimate)."""
    long_ldm_overhead_s: float
    """Stage 2's time outside its steps: start-up, rendering the data, the latent cache, the export."""
    long_ldm_steps: tuple[int, int]
    """The least and the most stage-2 steps."""
    eval: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


GPU_SIZES = Sizes(
    budget_s=TOTAL_BUDGET_S,
    limits={
        "env": (60, 10), "train-512": (100, 40), "train-256": (90, 40), "sample": (60, 30),
        "sample-compiled": (150, 60), "smoke-fsdp": (50, 20),
        "long-vae": (100, 45), "long-ldm": (400, 80), "long-eval": (40, 20),
    },
    train=("--rounds", "1", "--warmup-steps", "5", "--steps", "20", "--log-every", "5", "--in-process"),
    train_512=("--resolution", "512", "--num-samples", "384"),
    train_256=("--resolution", "256", "--num-samples", "768"),
    sample=("--warmup-calls", "1", "--rounds", "3"),
    sample_compiled=("--warmup-calls", "2", "--rounds", "3"),
    smoke=("train.max_steps=20", "train.checkpointing_steps=10", "train.log_every=5", "train.mixed_precision=bf16"),
    long_vae=(),
    long_ldm=(),
    long_vae_steps=1500,
    long_ldm_steps_per_s=10.0,
    long_ldm_overhead_s=60.0,
    long_ldm_steps=(300, 4000),
    eval=("--images-per-prompt", "2", "--max-prompts-per-task", "8", "--steps", "25", "--batch-size", "64"),
)

DRY_SIZES = Sizes(
    budget_s=1800.0,
    limits={name: (300, 1) for name in GPU_SIZES.limits},
    train=("--model", "tiny", "--override", "model.text_encoder.train=false", "--device", "cpu",
           "--mixed-precision", "no", "--batch-size", "2", "--rounds", "1", "--warmup-steps", "1", "--steps", "1",
           "--log-every", "1", "--num-workers", "0", "--threads", "1", "--in-process"),
    train_512=("--resolution", "32", "--num-samples", "4"),
    train_256=("--resolution", "24", "--num-samples", "4"),
    sample=("--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--resolution", "32", "--steps", "2",
            "--warmup-calls", "1", "--rounds", "1", "--threads", "1"),
    sample_compiled=("--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--resolution", "32", "--steps", "2",
                     "--warmup-calls", "1", "--rounds", "1", "--threads", "1", "--compile-backend", "eager"),
    smoke=("train.max_steps=2", "train.checkpointing_steps=1", "train.log_every=1", "train.batch_size=4",
           "data.shapes.num_samples=16", "train.mixed_precision=no"),
    # The judge's check of the autoencoder and the caption gap run as on the GPU, on a few images: at
    # shapes-long's size on a CPU, 256 scenes and 64 held images cost 20 and 10 s of the suite.
    long_vae=("data.shapes.num_samples=32", "vae_train.batch_size=4", "vae_train.scaling_samples=16",
              "vae_train.judge_scenes=16", "vae_train.mixed_precision=no"),
    long_ldm=("data.shapes.num_samples=32", "train.batch_size=4", "train.mixed_precision=no", "train.caption_gap_images=8",
              "sample.prompts=[a red circle]", "sample.images_per_prompt=1", "sample.num_inference_steps=2"),
    long_vae_steps=2,
    long_ldm_steps_per_s=1.0,
    long_ldm_overhead_s=0.0,
    long_ldm_steps=(2, 2),
    eval=("--images-per-prompt", "1", "--max-prompts-per-task", "1", "--steps", "2", "--batch-size", "16"),
    env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
)


@dataclass
class Context:
    """One run: where things go, the clock, and the figures gathered so far."""

    sizes: Sizes
    dry: bool
    out: str
    work: str
    deadline: float
    started: float
    long_config: str
    long_vae: str | None
    log: Any = None
    env: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per step: status, seconds, limit, figures, headline."""
    machine: dict[str, Any] = field(default_factory=dict)
    command: str = "bash bench/gpu.sh"
    """The command as typed, recorded with each section."""

    @property
    def results_file(self) -> str:
        return os.path.join(self.out, RESULTS_NAME)

    def time_left(self) -> float:
        return self.deadline - time.time()

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)


@dataclass(frozen=True)
class Step:
    name: str
    part: str
    title: str
    command: Callable[[Context, float], list[str]]
    """The command, given the time this step may take (stage 2 sizes its steps by it)."""
    collect: Callable[[Context, str, dict[str, Any]], None] | None = None
    """``collect(ctx, name, result)`` reads the step's outputs into ``result['figures']`` and
    ``result['headline']`` (and may turn its status to ``failed`` when a check fails)."""
    needs: tuple[str, ...] = ()
    """Steps whose success this one depends on."""
    reserve_after_s: float = 0.0
    """Time kept back for the steps after this one (stage 2 leaves the eval its time)."""
    outside_checkout: bool = False
    """Run in the work folder, not the repository root: ``python -m latentdiff...`` would otherwise import the
    source folder ``latentdiff/`` (which lacks ``latentdiff.pipelines``, installed from ``pipelines/``)
    instead of the installed package."""


PYTHON = sys.executable


def _script(path: str, *arguments: str) -> list[str]:
    return [PYTHON, os.path.join(REPO_ROOT, path), *arguments]


def _launch(accelerate_config: str, script: str, *arguments: str, launch_arguments: tuple[str, ...] = ()) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/<config> [launch_arguments] training/<script> ...``"""
    return [PYTHON, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO_ROOT, "configs", "accelerate", accelerate_config), *launch_arguments,
            os.path.join(REPO_ROOT, "training", script), *arguments]


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file) or {}


def scaled_schedule_overrides(config: dict[str, Any], section: str, max_steps: int) -> list[str]:
    """``<section>.max_steps=N`` and the schedule's other step counts scaled by the same factor (the
    warm-up, the crop phase and the decoder fine-tune of stage 1, the start of stage 2's token mixing), so that a
    run of minutes has the recipe's schedule in small; intermediate checkpoints and validation grids off (``0``)."""
    values = config.get(section, {}) or {}
    full = values.get("max_steps")
    overrides = [f"{section}.max_steps={max_steps}"]
    if full:
        factor = max_steps / full
        for key in ("crop_steps",):
            if values.get(key) is not None:
                overrides.append(f"{section}.{key}={min(max_steps, max(1, round(values[key] * factor)))}")
        if values.get("token_mixing_from_step"):  # scaled, and still before the last step
            overrides.append(f"{section}.token_mixing_from_step={min(max_steps - 1, round(values['token_mixing_from_step'] * factor))}")
        if values.get("decoder_finetune_steps"):  # the steps after max_steps: scaled, at least one
            overrides.append(f"{section}.decoder_finetune_steps={max(1, round(values['decoder_finetune_steps'] * factor))}")
        warmup = (values.get("optimizer") or {}).get("lr_warmup_steps")
        if warmup:
            overrides.append(f"{section}.optimizer.lr_warmup_steps={max(1, round(warmup * factor))}")
    overrides.append(f"{section}.checkpointing_steps=0")
    if section == "train":
        overrides.append("train.validation_steps=0")
    return overrides


def long_ldm_steps(sizes: Sizes, seconds: float) -> int:
    """Stage 2's step count for ``seconds`` at the assumed speed, within the least and the most."""
    low, high = sizes.long_ldm_steps
    return int(min(high, max(low, math.floor((seconds - sizes.long_ldm_overhead_s) * sizes.long_ldm_steps_per_s))))


def plan(ctx: Context) -> list[Step]:
    sizes = ctx.sizes
    results = ctx.results_file

    def train(name: str, extra: tuple[str, ...]) -> Step:
        resolution = "512" if name == "train-512" else "256"
        return Step(
            name, "a", f"training, SD 1.5 U-Net at {resolution} px, bf16: ours against the recipe",
            lambda c, s: _script(
                "bench/train_throughput.py", "--preset", "sd15", "--resolution", resolution, "--fused-adamw",
                "--ours-override", "train.checkpointing_steps=0", "--ours-override", "train.export=false",
                *sizes.train, *extra, "--json", c.path(f"{name}.json"), "--record", results,
                "--note", "part (a) of bench/gpu.sh: one A/B round, both sides in one process (--in-process: two "
                          "start-ups saved; the CUDA peak is reset when each side starts), sized to fit the 9-minute "
                          "call; our side without its final checkpoint and export (train.checkpointing_steps=0, "
                          "train.export=false)",
            ),
            collect=collect_train,
        )

    def sample(name: str, extra: tuple[str, ...]) -> Step:
        compiled = name == "sample-compiled"
        return Step(
            name, "b", "sampling, SD 1.5 at 512 px, batch 1: LatentPipeline "
                       + ("with the U-Net compiled " if compiled else "") + "against StableDiffusionPipeline",
            lambda c, s: _script(
                "bench/sample_throughput.py", "--preset", "sd15", *(("--compile",) if compiled else ()),
                *extra, "--json", c.path(f"{name}.json"), "--record", results,
                "--note", "part (b) of bench/gpu.sh",
            ),
            collect=collect_sample,
        )

    def smoke(name: str, accelerate_config: str, launch_arguments: tuple[str, ...], overrides: tuple[str, ...]) -> Step:
        return Step(
            name, "d", f"smoke run of configs/accelerate/{accelerate_config}: a short pixel-space stage 2, tiny model",
            lambda c, s: _launch(
                accelerate_config, "train_ldm.py", "--config", os.path.join(REPO_ROOT, "configs", "tiny.yaml"),
                "model.pixel_space=true", *overrides, f"output_dir={c.path(name)}", "train.report_to=tensorboard",
                *sizes.smoke, launch_arguments=launch_arguments,
            ),
            collect=collect_smoke,
        )

    long_dir = ctx.path("long")
    config_arguments = ("--config", ctx.long_config)

    def long_vae(c: Context, seconds: float) -> list[str]:
        return _launch("gpu-1.yaml", "train_vae.py", *config_arguments, f"output_dir={long_dir}",
                       *scaled_schedule_overrides(_read_yaml(c.long_config), "vae_train", sizes.long_vae_steps),
                       *sizes.long_vae)

    def long_ldm(c: Context, seconds: float) -> list[str]:
        steps = long_ldm_steps(sizes, seconds)
        c.results.setdefault("long-ldm", {})["planned_steps"] = steps
        vae = [f"model.vae.pretrained={c.long_vae}"] if c.long_vae else []
        return _launch("gpu-1.yaml", "train_ldm.py", *config_arguments, f"output_dir={long_dir}", *vae,
                       *scaled_schedule_overrides(_read_yaml(c.long_config), "train", steps), *sizes.long_ldm)

    steps = [
        Step("env", "-", "the environment: imports, versions, the GPU, the carried wheels' requirements",
             lambda c, s: _script("bench/gpu.py", "env", "--json", c.path("env.json"), "--wheels", WHEELS_DIR),
             collect=collect_env),
        train("train-512", sizes.train_512),
        train("train-256", sizes.train_256),
        sample("sample", sizes.sample),
        sample("sample-compiled", sizes.sample_compiled),
        # The text encoder frozen: fsdp.yaml wraps BasicTransformerBlock and ResnetBlock2D, and Accelerate
        # refuses to prepare a model that has none of a listed class ("Could not find the transformer layer
        # class BasicTransformerBlock"), as a trained CLIP text encoder is; the U-Net has both.
        smoke("smoke-fsdp", "fsdp.yaml", ("--num_processes", "1"), ("model.text_encoder.train=false",)),
    ]
    if not ctx.long_vae:
        steps.append(Step("long-vae", "c", "configs/shapes-long.yaml, stage 1 (autoencoder), shortened", long_vae,
                          collect=collect_long_stage))
    steps += [
        Step("long-ldm", "c", "configs/shapes-long.yaml, stage 2 (U-Net and text encoder), in the time left",
             long_ldm, collect=collect_long_stage, needs=() if ctx.long_vae else ("long-vae",),
             reserve_after_s=sizes.limits["long-eval"][0]),
        Step("long-eval", "c", "latentdiff eval on a reduced shapes suite",
             lambda c, s: [PYTHON, "-m", "latentdiff.cli", "eval", os.path.join(long_dir, "pipeline"),
                           "--suite", "shapes", *sizes.eval, "--out", os.path.join(long_dir, "eval")],
             collect=collect_long_eval, needs=("long-ldm",), outside_checkout=True),
    ]
    return steps


# --------------------------------------------------------------------------------------------
# Running a step
# --------------------------------------------------------------------------------------------


def run_command(command: list[str], limit_s: float, log, env: dict[str, str], tail_lines: int = 15,
                cwd: str = REPO_ROOT) -> dict[str, Any]:
    """Run ``command`` in its own process group, its output into ``log``, for at most ``limit_s``
    seconds; then end the whole group (the launcher's children and DataLoader workers included).

    Returns ``{"status": ok | failed | timed out, "returncode", "seconds", "tail"}``.
    """
    import resource

    start, cpu_start = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def copy_output() -> None:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n").rsplit("\r", 1)[-1])

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(limit_s, 0.001))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    # The group's other members (a launcher's worker, DataLoader workers) may outlive the leader.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    reader.join(timeout=5)
    seconds = time.time() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that were waited for (the group's leader)
    cpu_seconds = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    status = "timed out" if timed_out else ("ok" if process.returncode == 0 else "failed")
    return {"status": status, "returncode": process.returncode, "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1), "tail": list(tail)}


def run_step(ctx: Context, step: Step) -> dict[str, Any]:
    limit, least = ctx.sizes.limits[step.name]
    result = ctx.results.setdefault(step.name, {})
    result.update(part=step.part, title=step.title, limit_s=limit, figures={}, headline="")
    failed_needs = [need for need in step.needs if ctx.results.get(need, {}).get("status") != "ok"]
    available = min(limit, ctx.time_left() - step.reserve_after_s)
    if failed_needs:
        result.update(status="skipped", seconds=0.0, headline=f"needs {', '.join(failed_needs)}, which did not succeed")
    elif available < least:
        result.update(status="skipped", seconds=0.0,
                      headline=f"{max(available, 0):.0f} s left of the {ctx.sizes.budget_s:.0f} s budget; it needs {least:.0f} s")
    if result.get("status") == "skipped":
        print(f"[{_clock(ctx)}] {step.name}: skipped ({result['headline']})", flush=True)
        return result
    try:
        command = step.command(ctx, available)
    except Exception as error:  # noqa: BLE001 - e.g. an unreadable config: this step fails, the next runs
        result.update(status="failed", seconds=0.0, headline=f"could not build its command: {type(error).__name__}: {error}")
        print(f"[{_clock(ctx)}] {step.name}: failed ({result['headline']})", flush=True)
        return result
    result["command"] = shlex.join(_relative(command))
    result["limit_s"] = round(available)
    print(f"[{_clock(ctx)}] {step.name}: {'dry run of: ' if ctx.dry else ''}{step.title} (limit {available:.0f} s)",
          flush=True)
    ctx.log.write(f"\n===== {step.name}: {result['command']}  (limit {available:.0f} s) =====\n")
    ctx.log.flush()
    result.update(run_command(command, available, ctx.log, ctx.env, cwd=ctx.work if step.outside_checkout else REPO_ROOT))
    if result["status"] == "ok" and step.collect is not None:
        try:
            step.collect(ctx, step.name, result)
        except Exception as error:  # noqa: BLE001 - a missing figure is reported, not fatal
            result["status"] = "failed"
            result["headline"] = f"finished, but its figures could not be read: {type(error).__name__}: {error}"
    elif result["status"] == "timed out":
        result["headline"] = f"stopped at its limit of {available:.0f} s"
    elif result["status"] == "failed":
        result["headline"] = f"exit code {result['returncode']}: {result['tail'][-1] if result['tail'] else ''}"
    print(f"[{_clock(ctx)}] {step.name}: {result['status']} in {result['seconds']:.0f} s"
          + (f": {result['headline']}" if result["headline"] else ""), flush=True)
    if result["status"] != "ok":
        for line in result["tail"]:
            print(f"    | {line}", flush=True)
    return result


def _clock(ctx: Context) -> str:
    return f"{time.time() - ctx.started:5.0f} s"


def _relative(command: list[str]) -> list[str]:
    """The command as typed from the repository root: paths inside it relative, ``python`` for the interpreter."""
    def short(argument: str) -> str:
        if argument == PYTHON:
            return "python"
        key, separator, value = argument.partition("=")
        if separator and value.startswith(REPO_ROOT + os.sep):
            return f"{key}={os.path.relpath(value, REPO_ROOT)}"
        return os.path.relpath(argument, REPO_ROOT) if argument.startswith(REPO_ROOT + os.sep) else argument

    return [short(argument) for argument in command]


# --------------------------------------------------------------------------------------------
# Reading each step's figures
# --------------------------------------------------------------------------------------------


def _json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def collect_env(ctx: Context, name: str, result: dict[str, Any]) -> None:
    report = _json(ctx.path("env.json"))
    ctx.machine = report.get("machine") or ctx.machine
    gpu = report.get("gpu")
    result["figures"] = {"gpu": gpu, "python": report.get("python"), "warnings": report.get("warnings", []),
                         "modules": {name: m["version"] for name, m in report.get("modules", {}).items()}}
    result["headline"] = (f"{gpu['name']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']}" if gpu else "no GPU") + (
        f"; {len(report['warnings'])} warning(s)" if report.get("warnings") else "")


def _target(value: float, target: float, ctx: Context) -> str:
    if ctx.dry or not value:
        return ""
    return f" (target {target:.0f}: {'met' if value >= target else 'not met'})"


def collect_train(ctx: Context, name: str, result: dict[str, Any]) -> None:
    summary = _json(ctx.path(f"{name}.json"))
    ours, recipe = summary["ours"], summary["recipe"]
    mfu = f", MFU {100 * ours['mfu']:.1f}%" if ours.get("mfu") else ""
    result["figures"] = {"ours_images_per_s": ours["images_per_s"], "recipe_images_per_s": recipe["images_per_s"],
                         "ratio": summary["ratio"], "ours_mfu": ours.get("mfu"), "recipe_mfu": recipe.get("mfu"),
                         "ours_peak_memory": ours["peak_memory"], "recipe_peak_memory": recipe["peak_memory"]}
    target = _target(ours["images_per_s"], TRAINING_TARGET_IMAGES_PER_S, ctx) if name == "train-512" else ""
    result["headline"] = (f"ours {ours['images_per_s']:.1f} images/s{mfu}{target}, recipe {recipe['images_per_s']:.1f}: "
                          f"{summary['ratio']:.2f}x; peak {ours['peak_memory'] / 2**30:.1f} / "
                          f"{recipe['peak_memory'] / 2**30:.1f} GiB")


def collect_sample(ctx: Context, name: str, result: dict[str, Any]) -> None:
    summary = _json(ctx.path(f"{name}.json"))
    ours, theirs = summary["ours"]["unet_it_per_s"], summary["diffusers"]["unet_it_per_s"]
    result["figures"] = {"ours_unet_it_per_s": ours, "diffusers_unet_it_per_s": theirs,
                         "ratio": summary["ratio_unet_it_per_s"], "ours_images_per_s": summary["ours"]["images_per_s"],
                         "max_abs_pixel_difference": summary["max_abs_pixel_difference"]}
    result["headline"] = (f"ours {ours:.1f} U-Net it/s{_target(ours, SAMPLING_TARGET_UNET_IT_PER_S, ctx)}, "
                          f"StableDiffusionPipeline {theirs:.1f}: {summary['ratio_unet_it_per_s']:.2f}x")


def _training_log(folder: str, subfolder: str) -> dict[str, Any]:
    """Steps, the last loss and the images/s of a training run, from its tensorboard events."""
    logs = os.path.join(folder, "logs", subfolder)
    losses = logged_scalars(logs, "loss")
    rates = logged_scalars(logs, "images_per_s")
    if not losses:
        raise RuntimeError(f"no loss was logged under {logs}")
    # The first interval holds the first step's start-up (allocations, kernel loading): left out when
    # there are others. Each interval holds the same images, so the run's rate is the harmonic mean.
    timed = rates[1:] if len(rates) > 1 else rates
    return {
        "steps": losses[-1][0],
        "final_loss": losses[-1][1],
        "images_per_s": len(timed) / sum(1 / value for _, value, _ in timed) if timed else None,
        "loop_seconds": (rates[-1][2] - rates[0][2]) if len(rates) > 1 else None,
    }


def collect_smoke(ctx: Context, name: str, result: dict[str, Any]) -> None:
    folder = ctx.path(name)
    log = _training_log(folder, "ldm")
    checkpoints = sorted(glob.glob(os.path.join(folder, "checkpoints", "checkpoint-*")))
    contents = sorted(os.listdir(checkpoints[-1])) if checkpoints else []
    sharded = any(entry.startswith("pytorch_model_fsdp") for entry in contents)
    exported = os.path.isfile(os.path.join(folder, "pipeline", "model_index.json"))
    finite = math.isfinite(log["final_loss"])
    result["figures"] = {**log, "checkpoints": [os.path.basename(c) for c in checkpoints],
                         "checkpoint_files": contents, "fsdp_sharded_checkpoint": sharded,
                         "pipeline_exported": exported}
    if not (exported and finite and checkpoints):
        result["status"] = "failed"
    result["headline"] = (f"{log['steps']} steps, final loss {log['final_loss']:.4f}, "
                          f"{len(checkpoints)} checkpoint(s) ({'FSDP sharded' if sharded else 'unsharded'}), "
                          f"pipeline {'exported' if exported else 'MISSING'}")


def collect_long_stage(ctx: Context, name: str, result: dict[str, Any]) -> None:
    stage_vae = name == "long-vae"
    folder = ctx.path("long")
    log = _training_log(folder, "vae" if stage_vae else "ldm")
    config = _read_yaml(os.path.join(folder, "config_vae.yaml" if stage_vae else "config.yaml"))
    section = config["vae_train" if stage_vae else "train"]
    log["batch_size"] = section["batch_size"]
    log["images_seen"] = log["steps"] * section["batch_size"]
    result["figures"] = log
    what = "autoencoder" if stage_vae else "U-Net + text encoder"
    rate = f", {log['images_per_s']:.0f} images/s" if log["images_per_s"] else ""
    result["headline"] = (f"{what}: {log['steps']} steps x {section['batch_size']} in {result['seconds'] / 60:.1f} min "
                          f"(wall){rate}, final loss {log['final_loss']:.4f}")


def collect_long_eval(ctx: Context, name: str, result: dict[str, Any]) -> None:
    evaluation = _json(ctx.path("long", "eval", "results.json"))
    stage2 = ctx.results["long-ldm"]
    minutes = stage2["seconds"] / 60
    overall = evaluation["overall"]
    result["figures"] = {
        "overall": overall, "unseen": evaluation["unseen"],
        "tasks": {task: value["accuracy"] for task, value in evaluation["tasks"].items()},
        "num_images": evaluation["num_images"], "stage2_minutes": minutes,
        "overall_per_stage2_minute": overall / minutes if overall is not None and minutes else None,
    }
    unseen = f", unseen {evaluation['unseen']:.3f}" if evaluation["unseen"] is not None else ""
    result["headline"] = (f"overall {overall:.3f}{unseen} on {evaluation['num_images']} images, after "
                          f"{minutes:.1f} min of stage 2")


# --------------------------------------------------------------------------------------------
# Sections of the results file
# --------------------------------------------------------------------------------------------


def _report(ctx: Context, title: str, settings: list[tuple[str, str]], header: list[str], rows: list[list[str]],
            notes: list[str]) -> Report:
    machine = dict(ctx.machine) or fallback_machine(ctx)
    return Report(title=title, machine=machine, commit=git_commit(), command=ctx.command, settings=settings,
                  header=header, rows=rows, notes=notes)


def fallback_machine(ctx: Context) -> dict[str, Any]:
    """A machine description without torch or diffusers (when the env step could not give one)."""
    import platform

    from common import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": "?", "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": "?", "diffusers": "?",
            "device": "cpu" if ctx.dry else "cuda"}


def _seconds(result: dict[str, Any]) -> str:
    return f"{result.get('seconds', 0):.0f}"


def record_long(ctx: Context) -> None:
    """The shapes-long section: each stage's steps, images, minutes and speed, then the adherence."""
    stages = [name for name in ("long-vae", "long-ldm", "long-eval") if name in ctx.results]
    if not stages:
        return
    rows = []
    for name in stages:
        result = ctx.results[name]
        figures = result.get("figures", {})
        if name == "long-eval":
            rows.append([name, "-", "-", _seconds(result), "-",
                         result["headline"] if result["status"] == "ok" else f"{result['status']}: {result['headline']}"])
            continue
        rate = figures.get("images_per_s")
        rows.append([
            name, str(figures.get("steps", "-")), str(figures.get("images_seen", "-")), _seconds(result),
            f"{rate:.0f}" if rate else "-",
            f"final loss {figures['final_loss']:.4f}" if result["status"] == "ok" else f"{result['status']}: {result['headline']}",
        ])
    evaluation = ctx.results.get("long-eval", {}).get("figures", {})
    notes = []
    if evaluation.get("tasks"):
        notes.append("Per task: " + ", ".join(f"{task} {value:.3f}" for task, value in evaluation["tasks"].items()))
    if evaluation.get("overall_per_stage2_minute") is not None:
        notes.append(f"Adherence per minute of stage 2 (wall time, start-up, data and cache included): "
                     f"{evaluation['overall_per_stage2_minute']:.3f} overall per minute "
                     f"({evaluation['overall']:.3f} after {evaluation['stage2_minutes']:.1f} min).")
    settings = [
        ("Config", f"`{os.path.relpath(ctx.long_config, REPO_ROOT)}`, shortened: step counts (and the schedule's warm-up "
                   "and crop phase in proportion) sized for minutes; stage 2 gets the time left in the call "
                   f"(planned {ctx.results.get('long-ldm', {}).get('planned_steps', '-')} steps)"
                   + (f"; stage 1's autoencoder carried: `{ctx.long_vae}`" if ctx.long_vae else "")),
    ] + [(name, f"`{ctx.results[name]['command']}`") for name in stages if ctx.results[name].get("command")]
    _report(ctx, "shapes-long in minutes: stage 1, stage 2 in the time left, reduced eval", settings,
            ["step", "steps", "images seen", "wall time (s)", "images/s (logged)", "result"], rows,
            notes).append_to(ctx.results_file)


def record_smoke(ctx: Context) -> None:
    """The accelerate configs on one GPU: gpu-1.yaml through part (c)'s two training runs, which it
    launches, and fsdp.yaml through its own short run."""
    rows = []
    long_runs = [name for name in ("long-vae", "long-ldm") if name in ctx.results]
    if long_runs:
        statuses = {ctx.results[name]["status"] for name in long_runs}
        ldm = ctx.results.get("long-ldm", {}).get("figures", {})
        rows.append([
            "configs/accelerate/gpu-1.yaml", " and ".join(long_runs) + " (part c)",
            "ok" if statuses == {"ok"} else "/".join(sorted(statuses)),
            " + ".join(str(ctx.results[name].get("figures", {}).get("steps", "-")) for name in long_runs),
            f"{ldm['final_loss']:.4f}" if "final_loss" in ldm else "-", "none (checkpointing off)", "no",
            "yes" if os.path.isfile(ctx.path("long", "pipeline", "model_index.json")) else "no",
            str(round(sum(ctx.results[name].get("seconds", 0) for name in long_runs))),
        ])
    if "smoke-fsdp" in ctx.results:
        result = ctx.results["smoke-fsdp"]
        figures = result.get("figures", {})
        rows.append([
            "configs/accelerate/fsdp.yaml, --num_processes 1", "smoke-fsdp", result["status"],
            str(figures.get("steps", "-")), f"{figures['final_loss']:.4f}" if "final_loss" in figures else "-",
            ", ".join(figures.get("checkpoints", [])) or "-", "yes" if figures.get("fsdp_sharded_checkpoint") else "no",
            "yes" if figures.get("pipeline_exported") else "no", _seconds(result),
        ])
    if not rows:
        return
    settings = [("smoke-fsdp", f"`{ctx.results['smoke-fsdp']['command']}`")] if ctx.results.get("smoke-fsdp", {}).get("command") else []
    notes = ["FSDP in effect shows in the checkpoint: Accelerate writes a sharded `pytorch_model_fsdp_*` folder "
             "(SHARDED_STATE_DICT, as configs/accelerate/fsdp.yaml asks) only when the model was wrapped.",
             "The smoke run passes when it exits 0 with a finite loss, its checkpoints and the exported pipeline."]
    _report(ctx, "accelerate configs on one GPU: smoke runs", settings,
            ["config", "run", "status", "steps", "final loss", "checkpoints", "FSDP sharded", "pipeline exported",
             "wall time (s)"], rows, notes).append_to(ctx.results_file)


def record_summary(ctx: Context) -> None:
    rows = [[name, result.get("part", "-"), result["status"], _seconds(result), f"{result.get('limit_s', 0):.0f}",
             result.get("headline", "").replace("|", "/")] for name, result in ctx.results.items()]
    total = time.time() - ctx.started
    settings = [("Budget", f"{ctx.sizes.budget_s:.0f} s for the whole call (wheel installs included); used "
                           f"{total:.0f} s")]
    _report(ctx, "bench/gpu.sh: every part, its time and status", settings,
            ["step", "part", "status", "wall time (s)", "limit (s)", "figures"], rows, []).append_to(ctx.results_file)


def print_summary(ctx: Context) -> None:
    print(f"\n{'step':<16} {'status':<10} {'time':>6} {'limit':>6} {'CPU':>6}  figures")
    for name, result in ctx.results.items():
        print(f"{name:<16} {result['status']:<10} {result.get('seconds', 0):>5.0f}s {result.get('limit_s', 0):>5.0f}s "
              f"{result.get('cpu_seconds', 0):>5.0f}s  "
              f"{result.get('headline', '')}")
    print(f"total {time.time() - ctx.started:.0f} s of the {ctx.sizes.budget_s:.0f} s budget; results in "
          f"{ctx.results_file} (take them in here with: python bench/gpu.py merge <that file>)")


def _command_line() -> str:
    return shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT), *sys.argv[1:]])


def commit_from_stamp(wheels: str) -> str | None:
    """Outside a git checkout: the stamp's commit, with the files that changed since it was written."""
    path = os.path.join(wheels, SOURCE_STAMP)
    if not os.path.isfile(path):
        return None
    stamp = _json(path)
    changed = [name for name, digest in stamp["files"].items()
               if not os.path.isfile(os.path.join(REPO_ROOT, name)) or file_digest(os.path.join(REPO_ROOT, name)) != digest]
    if not changed:
        return stamp["commit"]
    return f"{stamp['commit']} + {len(changed)} files changed since the wheel step ({', '.join(changed[:5])})"


# --------------------------------------------------------------------------------------------
# run: the plan on the GPU machine (or, with --dry-run, on the CPU)
# --------------------------------------------------------------------------------------------


def _in_git_checkout() -> bool:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True).returncode == 0
    except OSError:  # no git on the machine
        return False


def command_run(args: argparse.Namespace) -> int:
    started = args.started_at or time.time()
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    budget = args.budget_s or sizes.budget_s
    sizes = dataclasses.replace(sizes, budget_s=budget)
    if args.long_vae and not os.path.isfile(os.path.join(args.long_vae, "config.json")):
        print(f"gpu.py run: --long-vae {args.long_vae!r} is not an autoencoder folder (no config.json)", file=sys.stderr)
        return 2
    chosen = [name.strip() for name in (args.steps or "").split(",") if name.strip()]
    unknown = [name for name in chosen if name not in sizes.limits]
    if unknown:
        print(f"gpu.py run: --steps: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(sizes.limits)}",
              file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="latentdiff-gpu-"))
    ctx = Context(sizes=sizes, dry=args.dry_run, out=out, work=work, deadline=started + budget - WRAP_UP_S, started=started,
                  long_config=os.path.abspath(args.long_config),
                  long_vae=os.path.abspath(args.long_vae) if args.long_vae else None)
    steps = [step for step in plan(ctx) if not chosen or step.name in chosen]

    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(("gpu", "long-")):
            os.remove(os.path.join(out, name))
    ctx.command = args.command_line or _command_line()
    ctx.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10", **sizes.env}
    if not _in_git_checkout():
        commit = commit_from_stamp(WHEELS_DIR)
        if commit:
            ctx.env[COMMIT_ENV] = os.environ[COMMIT_ENV] = commit
    with open(ctx.results_file, "w", encoding="utf-8") as file:
        file.write(f"# GPU run of bench/gpu.sh ({datetime.datetime.now():%Y-%m-%d %H:%M})\n\n"
                   "Sections in bench/RESULTS.md's format; `python bench/gpu.py merge <this file>` adds each to "
                   "the same part of bench/RESULTS.md, unchanged.\n")
    print(f"bench/gpu.sh{' --dry-run' if ctx.dry else ''}: {len(steps)} steps, {budget:.0f} s budget "
          f"({time.time() - started:.0f} s already spent installing); work folder {work}", flush=True)
    with open(os.path.join(out, LOG_NAME), "a", encoding="utf-8") as log:
        ctx.log = log
        for step in steps:
            run_step(ctx, step)

    for record in (record_smoke, record_long, record_summary):
        try:
            record(ctx)
        except Exception as error:  # noqa: BLE001 - the summary still prints
            print(f"could not record {record.__name__}: {type(error).__name__}: {error}")
    for source, name in ((ctx.path("long", "eval", "results.json"), "long-eval.json"),
                         (ctx.path("long", "eval", "grid.png"), "long-eval-grid.png"),
                         (ctx.path("long", "pipeline", "samples.png"), "long-samples.png"),
                         (ctx.path("long", "vae_reconstructions.png"), "long-vae-reconstructions.png")):
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out, name))
    with open(os.path.join(out, SUMMARY_NAME), "w", encoding="utf-8") as file:
        json.dump({"dry_run": ctx.dry, "budget_s": budget, "seconds": round(time.time() - started, 1),
                   "commit": git_commit(), "machine": ctx.machine, "steps": ctx.results}, file, indent=1, default=str)
    print_summary(ctx)
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(result["status"] == "ok" for result in ctx.results.values()) else 1


def command_merge(args: argparse.Namespace) -> int:
    parts = take_in(args.results_file, args.into)
    print(f"took the sections of {args.results_file} into {args.into} (parts: {', '.join(parts)})")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="verb", required=True)

    run = commands.add_parser("run", help="run every part (bench/gpu.sh calls this)")
    run.add_argument("--out", required=True, help="folder for the results (the device tool's $OUT)")
    run.add_argument("--workdir", help="folder for the runs' files (default: a temporary folder, removed at the end)")
    run.add_argument("--keep-workdir", action="store_true", help="keep the temporary work folder")
    run.add_argument("--dry-run", action="store_true", help="the same plan on the CPU: tiny model, tiny sizes")
    run.add_argument("--budget-s", type=float, help=f"the whole call's time (default {TOTAL_BUDGET_S:.0f} s on a GPU)")
    run.add_argument("--started-at", type=float, help="when gpu.sh started (seconds since the epoch): the budget counts from then")
    run.add_argument("--long-config", default=os.path.join(REPO_ROOT, "configs", "shapes-long.yaml"),
                     help="the longer preset for part (c) (default configs/shapes-long.yaml)")
    run.add_argument("--long-vae", help="a trained stage-1 autoencoder folder for part (c), carried along: stage 1 is then skipped")
    run.add_argument("--steps", metavar="NAME,...", help="run only these steps (default all), e.g. train-512,sample-compiled")
    run.add_argument("--command-line", help=argparse.SUPPRESS)

    wheels = commands.add_parser("wheels", help="download what the GPU machine lacks (run here, before a GPU session)")
    wheels.add_argument("--dest", default=WHEELS_DIR, help="folder (default .whl/ of the repository, which git ignores)")
    wheels.add_argument("--python-version", default=MACHINE_PYTHON, help=f"the GPU machine's Python (default {MACHINE_PYTHON})")

    env = commands.add_parser("env", help="check the environment (the first step of a run)")
    env.add_argument("--json", required=True)
    env.add_argument("--wheels", default=WHEELS_DIR)

    merge = commands.add_parser("merge", help="take a run's results file into bench/RESULTS.md")
    merge.add_argument("results_file")
    merge.add_argument("--into", default=DEFAULT_RESULTS_FILE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"run": command_run, "wheels": command_wheels, "env": command_env, "merge": command_merge}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
