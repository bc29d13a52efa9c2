"""bench/gpu.sh, the one prepared call that measures everything that needs a GPU: its dry run on the
CPU (the same plan with the tiny model and tiny sizes), and the parts of its machinery that a dry run
cannot show going wrong (time limits, failures, the budget, the wheel set, taking the results in).

Nothing here is timed: the figures of a dry run mean nothing, only that every step ran and wrote them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from latentdiff.testing import load_bench_script

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO_ROOT, "bench")


_load = load_bench_script  # a bench script as a module


@pytest.fixture(scope="module")
def gpu():
    return _load("gpu")


def _dry_run(tmp_path, steps: list[str]):
    """``bash bench/gpu.sh --dry-run --steps ...``: its summary and results file."""
    out, work = tmp_path / "out", tmp_path / "work"
    process = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu.sh"), "--dry-run", "--out", str(out), "--workdir", str(work),
         "--steps", ",".join(steps)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    summary = json.loads((out / "gpu-summary.json").read_text())
    assert summary["dry_run"] is True and list(summary["steps"]) == steps
    assert {name: step["status"] for name, step in summary["steps"].items()} == dict.fromkeys(steps, "ok")
    # Every file comes back through the device tool: at most 8, no folders.
    returned = sorted(os.listdir(out))
    assert len(returned) <= 8 and all((out / name).is_file() for name in returned)
    return summary["steps"], (out / "gpu-results.md").read_text(), out


def _section_titles(results: str) -> list[str]:
    """The ``###`` headings without their dates; a CPU run files every one under ``## CPU``."""
    headings = [line for line in results.splitlines() if line.startswith("#")]
    assert [h for h in headings if h.startswith("## ")] == ["## CPU"]
    return [h.split(" (")[0] for h in headings if h.startswith("### ")]


# The dry run of the whole plan, in two halves that the suite's two workers run side by side (each
# step is a fresh process, mostly importing torch and diffusers: about 90 s of CPU in all).
FIRST_HALF = ["env", "train-512", "train-256", "sample", "sample-compiled"]
SECOND_HALF = ["smoke-fsdp", "long-vae", "long-ldm", "long-eval"]


def test_the_two_halves_of_the_dry_run_are_the_whole_plan(gpu, tmp_path):
    ctx = _context(gpu, tmp_path)
    names = [step.name for step in gpu.plan(ctx)]
    assert names == FIRST_HALF + SECOND_HALF == list(gpu.GPU_SIZES.limits) == list(gpu.DRY_SIZES.limits)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_of_the_throughput_parts(tmp_path, gpu):
    steps, results, _ = _dry_run(tmp_path, FIRST_HALF)
    for name in ("train-512", "train-256"):
        figures = steps[name]["figures"]
        assert figures["ours_images_per_s"] > 0 and figures["recipe_images_per_s"] > 0
        assert math.isclose(figures["ratio"], figures["ours_images_per_s"] / figures["recipe_images_per_s"], rel_tol=1e-9)
        assert "--preset sd15" in steps[name]["command"] and "--fused-adamw" in steps[name]["command"]
    for name in ("sample", "sample-compiled"):
        assert steps[name]["figures"]["ours_unet_it_per_s"] > 0 and steps[name]["figures"]["diffusers_unet_it_per_s"] > 0
    assert "--compile" in steps["sample-compiled"]["command"] and "--compile" not in steps["sample"]["command"]
    assert _section_titles(results) == [
        "### train_throughput, preset sd15, 32 px, cpu", "### train_throughput, preset sd15, 24 px, cpu",
        "### sample_throughput, preset sd15, 32 px, cpu", "### sample_throughput, preset sd15, 32 px, cpu",
        "### bench/gpu.sh: every part, its time and status",
    ]
    assert "- Command: `python bench/train_throughput.py --preset sd15 --resolution 512" in results


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_of_the_smoke_and_shapes_long_parts_and_taking_the_results_in(tmp_path, gpu):
    steps, results, out = _dry_run(tmp_path, SECOND_HALF)
    figures = steps["smoke-fsdp"]["figures"]
    assert figures["pipeline_exported"] and math.isfinite(figures["final_loss"]) and figures["checkpoints"]
    assert "configs/accelerate/fsdp.yaml --num_processes 1" in steps["smoke-fsdp"]["command"]
    for name in ("long-vae", "long-ldm"):  # part (c) is the run of configs/accelerate/gpu-1.yaml
        assert "--config_file configs/accelerate/gpu-1.yaml" in steps[name]["command"]
        assert "--config configs/shapes-long.yaml" in steps[name]["command"]
    # Stage 2 ran the steps it was sized to.
    assert steps["long-ldm"]["figures"]["steps"] == steps["long-ldm"]["planned_steps"] == 2
    evaluation = steps["long-eval"]["figures"]
    assert 0 <= evaluation["overall"] <= 1 and evaluation["num_images"] > 0
    assert evaluation["stage2_minutes"] == pytest.approx(steps["long-ldm"]["seconds"] / 60)
    assert {"long-eval.json", "long-eval-grid.png", "long-samples.png"} <= set(os.listdir(out))
    titles = _section_titles(results)
    assert titles == [
        "### accelerate configs on one GPU: smoke runs",
        "### shapes-long in minutes: stage 1, stage 2 in the time left, reduced eval",
        "### bench/gpu.sh: every part, its time and status",
    ]
    assert "- Command: `bash bench/gpu.sh --dry-run" in results
    assert "| configs/accelerate/gpu-1.yaml | long-vae and long-ldm (part c) | ok |" in results

    # bench/RESULTS.md takes the file in unchanged, each section at the end of its part.
    into = tmp_path / "RESULTS.md"
    into.write_text("# Benchmark results\n\n## CPU\n\n### an older run\n\ntext\n\n## GPU\n\nnone yet\n")
    assert gpu.main(["merge", str(out / gpu.RESULTS_NAME), "--into", str(into)]) == 0
    merged = into.read_text()
    first = next(line for line in results.splitlines() if line.startswith("### "))
    sections = results[results.index(first):].rstrip("\n")
    assert sections in merged
    assert merged.index("### an older run") < merged.index(first) < merged.index("## GPU")


def _context(gpu, tmp_path, budget_s: float = 60.0, limits: dict | None = None):
    sizes = gpu.dataclasses.replace(gpu.DRY_SIZES, budget_s=budget_s, limits=limits or gpu.DRY_SIZES.limits)
    now = time.time()
    ctx = gpu.Context(sizes=sizes, dry=True, out=str(tmp_path), work=str(tmp_path), deadline=now + budget_s,
                      started=now, long_config="", long_vae=None)
    ctx.log = open(tmp_path / "log.txt", "a", encoding="utf-8")
    ctx.env = dict(os.environ)
    return ctx


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed one whose parent is gone may stay a zombie until reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_that_fails_or_runs_out_of_time_is_reported_and_the_next_one_runs(gpu, tmp_path):
    child_pid = tmp_path / "child.pid"
    sleeper = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(child_pid)!r}, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)"
    )
    limits = {"slow": (2.0, 1.0), "broken": (30.0, 1.0), "fine": (30.0, 1.0)}
    ctx = _context(gpu, tmp_path, limits=limits)
    steps = [
        gpu.Step("slow", "x", "sleeps past its limit", lambda c, s: [sys.executable, "-c", sleeper]),
        gpu.Step("broken", "x", "exits with 3", lambda c, s: [sys.executable, "-c", "print('bad input'); raise SystemExit(3)"]),
        gpu.Step("fine", "x", "succeeds", lambda c, s: [sys.executable, "-c", "print('done')"], needs=("broken",)),
    ]
    start = time.time()
    results = [gpu.run_step(ctx, step) for step in steps]
    assert time.time() - start < 25  # the sleeper was stopped at its 2 s limit, not after 60 s

    assert results[0]["status"] == "timed out" and "stopped at its limit" in results[0]["headline"]
    assert results[0]["tail"] == ["started"]
    # The whole process group was ended: the sleeper's own child too.
    pid = int(child_pid.read_text())
    time.sleep(0.5)
    assert not _running(pid)
    assert results[1]["status"] == "failed" and results[1]["returncode"] == 3 and "bad input" in results[1]["headline"]
    # A step that needs a failed one is skipped, with the reason.
    assert results[2]["status"] == "skipped" and "needs broken" in results[2]["headline"]
    log = (tmp_path / "log.txt").read_text()
    assert "===== slow:" in log and "bad input" in log


def test_a_step_without_enough_budget_left_is_skipped_and_a_limit_never_passes_the_budget(gpu, tmp_path):
    ctx = _context(gpu, tmp_path, budget_s=5.0, limits={"quick": (60.0, 1.0), "long": (60.0, 30.0)})
    quick = gpu.run_step(ctx, gpu.Step("quick", "x", "", lambda c, s: [sys.executable, "-c", "pass"]))
    long = gpu.run_step(ctx, gpu.Step("long", "x", "", lambda c, s: [sys.executable, "-c", "pass"]))
    assert quick["status"] == "ok" and quick["limit_s"] <= 5
    assert long["status"] == "skipped" and "left of the 5 s budget; it needs 30 s" in long["headline"]


def test_a_command_that_cannot_be_built_fails_its_step_only(gpu, tmp_path):
    ctx = _context(gpu, tmp_path, limits={"unreadable": (60.0, 1.0)})

    def command(c, seconds):
        raise FileNotFoundError("configs/missing.yaml")

    result = gpu.run_step(ctx, gpu.Step("unreadable", "x", "", command))
    assert result["status"] == "failed" and "configs/missing.yaml" in result["headline"]


def test_stage_2_is_sized_to_the_time_left_at_a_low_speed(gpu):
    sizes = gpu.GPU_SIZES
    low, high = sizes.long_ldm_steps
    seconds = sizes.long_ldm_overhead_s + 100
    assert gpu.long_ldm_steps(sizes, seconds) == 100 * sizes.long_ldm_steps_per_s
    assert gpu.long_ldm_steps(sizes, 0) == low
    assert gpu.long_ldm_steps(sizes, 10**6) == high


def test_a_shortened_run_keeps_the_recipes_schedule_in_proportion(gpu):
    config = {"vae_train": {"max_steps": 8000, "crop_steps": 6000, "decoder_finetune_steps": 2000,
                            "optimizer": {"lr_warmup_steps": 200}},
              "train": {"max_steps": 30000, "token_mixing_from_step": 15000, "optimizer": {"lr_warmup_steps": 500}}}
    assert gpu.scaled_schedule_overrides(config, "vae_train", 2000) == [
        "vae_train.max_steps=2000", "vae_train.crop_steps=1500", "vae_train.decoder_finetune_steps=500",
        "vae_train.optimizer.lr_warmup_steps=50", "vae_train.checkpointing_steps=0",
    ]
    assert "vae_train.decoder_finetune_steps=1" in gpu.scaled_schedule_overrides(config, "vae_train", 2)
    assert gpu.scaled_schedule_overrides(config, "train", 600) == [
        "train.max_steps=600", "train.token_mixing_from_step=300", "train.optimizer.lr_warmup_steps=10",
        "train.checkpointing_steps=0", "train.validation_steps=0",
    ]
    # The mixing's start stays before the last step, however short the run (else the config is refused).
    assert "train.token_mixing_from_step=1" in gpu.scaled_schedule_overrides(config, "train", 2)
    # Keys the config leaves to the defaults are left alone.
    assert gpu.scaled_schedule_overrides({}, "train", 50) == [
        "train.max_steps=50", "train.checkpointing_steps=0", "train.validation_steps=0"
    ]
    # The real preset's overrides are valid config keys.
    from latentdiff.config import load_config

    path = os.path.join(REPO_ROOT, "configs", "shapes-long.yaml")
    yaml_config = gpu._read_yaml(path)
    overrides = gpu.scaled_schedule_overrides(yaml_config, "vae_train", 2000) + gpu.scaled_schedule_overrides(
        yaml_config, "train", 900)
    config = load_config([path], overrides)
    assert (config.vae_train.max_steps, config.train.max_steps) == (2000, 900)
    assert config.vae_train.decoder_finetune_steps == 500
    assert config.train.token_mixing_from_step == 450


def test_the_carried_wheels_must_cover_every_requirement_the_machine_lacks(gpu):
    carried = (
        gpu.Carried("datasets", "imported", ""),
        gpu.Carried("dill", "imported", ""),
        gpu.Carried("diffusers", "imported", "", unused_requirements=("importlib-metadata",)),
        gpu.Carried("open_clip_torch", "data", ""),
    )
    wheels = [
        {"name": "datasets", "version": "5.2.0",
         "requires": ["dill<0.4.2,>=0.3.0", "pyarrow>=24.0.0", "huggingface-hub>=1.31.0",
                      "tomli; python_version < '3.11'", "pytest; extra == 'tests'"]},
        {"name": "dill", "version": "0.4.1", "requires": []},
        {"name": "diffusers", "version": "0.42.1", "requires": ["importlib_metadata", "huggingface-hub>=1.40",
                                                                 "safetensors>=0.8.0"]},
        {"name": "open_clip_torch", "version": "3.3.0", "requires": ["ftfy", "timm>=1.0.17"]},
    ]
    missing, conflicts = gpu.unmet_requirements(wheels, carried, "3.12")
    assert missing == []  # dill carried; pyarrow and the hub on the machine; markers and extras left out
    assert conflicts == ["diffusers needs huggingface-hub>=1.40; 1.33.0 is on the machine"]

    wheels[0]["requires"].append("multiprocess<0.70.20")
    missing, _ = gpu.unmet_requirements(wheels, carried, "3.12")
    assert missing == ["datasets needs multiprocess<0.70.20 (neither on the machine nor carried)"]


def test_the_wheel_set_names_every_package_the_gpu_path_imports_that_the_machine_lacks(gpu):
    carried = {gpu._normalize(entry.name) for entry in gpu.CARRIED}
    machine = gpu.MACHINE_PACKAGES
    for package in ("diffusers", "datasets", "open-clip-torch"):
        assert package in carried and package not in machine
    for package in ("torch", "accelerate", "transformers", "pyarrow", "tensorboard", "scipy"):
        assert package in machine and package not in carried


def test_the_clip_tokenizer_reads_open_clips_vocabulary_without_importing_it():
    check = (
        "import sys; from latentdiff import clip_tokenizer; tokenizer = clip_tokenizer(); "
        "assert tokenizer('a red circle').input_ids == [49406, 320, 736, 7117, 49407]; "
        "print(sorted(m for m in ('open_clip', 'timm', 'ftfy') if m in sys.modules))"
    )
    process = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip() == "[]"


def test_the_commit_of_files_without_git_comes_from_the_wheel_steps_stamp(gpu, tmp_path, monkeypatch):
    readme = os.path.join(REPO_ROOT, "README.md")
    stamp = {"commit": "abc1234", "files": {"README.md": gpu.file_digest(readme)}}
    (tmp_path / gpu.SOURCE_STAMP).write_text(json.dumps(stamp))
    assert gpu.commit_from_stamp(str(tmp_path)) == "abc1234"
    stamp["files"]["bench/gpu.py"] = "0" * 64
    (tmp_path / gpu.SOURCE_STAMP).write_text(json.dumps(stamp))
    assert gpu.commit_from_stamp(str(tmp_path)) == "abc1234 + 1 files changed since the wheel step (bench/gpu.py)"
    assert gpu.commit_from_stamp(str(tmp_path / "none")) is None

    common = _load("common")
    monkeypatch.setenv(common.COMMIT_ENV, "abc1234")
    assert common.git_commit() == "abc1234"


def test_merge_refuses_a_file_without_sections(gpu, tmp_path):
    empty = tmp_path / "results.md"
    empty.write_text("# GPU run\n\n## GPU\n\nnothing\n")
    with pytest.raises(ValueError, match="holds no '### ' section"):
        gpu.main(["merge", str(empty), "--into", str(tmp_path / "RESULTS.md")])
