"""Smoke tests of the benchmark scripts (bench/): each runs end to end in ``--quick`` mode and reports
a ratio. Nothing here is timed: the figures of a quick run mean nothing, only that they exist and
are consistent with each other."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from latentdiff.testing import load_bench_script

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO_ROOT, "bench")


_load = load_bench_script  # a bench script as a module


def _run(script: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


def _results_file(tmp_path) -> str:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n")
    return str(path)


@pytest.mark.slow
def test_train_throughput_quick_reports_a_ratio(tmp_path):
    results, figures = _results_file(tmp_path), tmp_path / "train.json"
    process = _run("train_throughput.py", "--quick", "--json", str(figures), "--record", results)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "ratio (ours / recipe):" in process.stdout

    summary = json.loads(figures.read_text())
    ours, recipe = summary["ours"]["images_per_s"], summary["recipe"]["images_per_s"]
    assert ours > 0 and recipe > 0
    assert math.isclose(summary["ratio"], ours / recipe, rel_tol=1e-9)
    assert len(summary["per_round_ratios"]) == 1 and math.isclose(summary["per_round_ratios"][0], ours / recipe)
    assert summary["settings"]["model"] == "tiny"
    # The U-Net's training FLOPs are 3 forward passes; FLOP/s follow from images/s.
    assert summary["unet_training_flops_per_image"] > 0
    assert math.isclose(summary["ours"]["flops_per_s"], ours * summary["unet_training_flops_per_image"], rel_tol=1e-9)
    assert summary["ours"]["mfu"] is None  # no bf16 peak on a CPU
    assert "latent cache" in summary["sides"]["ours"] and "VAE encode every step" in summary["sides"]["recipe"]

    recorded = open(results, encoding="utf-8").read()
    assert recorded.startswith("# Results\n")
    assert "### train_throughput, preset quick (tiny)" in recorded and "| ratio ours / recipe |" in recorded
    assert "- Commit: `" in recorded and "- Command: `python bench/train_throughput.py --quick" in recorded


@pytest.mark.slow
def test_train_throughput_with_a_frozen_text_encoder_caches_its_embeddings(tmp_path):
    figures = tmp_path / "train.json"
    process = _run("train_throughput.py", "--quick", "--override", "model.text_encoder.train=false", "--json", str(figures))
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    summary = json.loads(figures.read_text())
    assert summary["ours"]["images_per_s"] > 0 and summary["recipe"]["images_per_s"] > 0
    assert "text-embedding cache" in summary["sides"]["ours"] and "text encoder frozen" in summary["sides"]["ours"]
    assert "run every step (no_grad)" in summary["sides"]["recipe"]


@pytest.mark.slow
def test_sample_throughput_quick_reports_a_ratio(tmp_path):
    figures = tmp_path / "sample.json"
    process = _run("sample_throughput.py", "--quick", "--json", str(figures))
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "ratio (ours / diffusers):" in process.stdout

    summary = json.loads(figures.read_text())
    for side in ("ours", "diffusers"):
        assert summary[side]["unet_it_per_s"] > 0 and summary[side]["images_per_s"] > 0
    assert math.isclose(
        summary["ratio_unet_it_per_s"], summary["ours"]["unet_it_per_s"] / summary["diffusers"]["unet_it_per_s"],
        rel_tol=1e-9,
    )
    # Same components, scheduler, seed and steps: both pipelines draw the same images.
    assert summary["max_abs_pixel_difference"] < 1e-4


def test_runs_alternate_between_the_two_sides():
    common = _load("common")
    assert common.interleaved(3) == [
        (0, "ours"), (0, "recipe"), (1, "recipe"), (1, "ours"), (2, "ours"), (2, "recipe")
    ]
    with pytest.raises(ValueError, match="rounds"):
        common.interleaved(0)


def test_ratios_are_also_taken_within_each_round():
    common = _load("common")
    assert common.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="2 figures for our side but 1"):
        common.paired_ratios([2.0, 3.0], [1.0])


def test_unet_flops_are_counted_without_running_the_model():
    common = _load("common")
    from latentdiff.config import load_config

    model = load_config(overrides={"model.preset": "tiny"}).model
    one, two = common.unet_forward_flops(model, 16, 1), common.unet_forward_flops(model, 16, 2)
    assert one > 0 and two == 2 * one  # linear in the batch


def test_unet_flops_by_block_are_shares_of_the_forward():
    common = _load("common")
    from latentdiff.config import load_config

    model = load_config(overrides={"model.preset": "tiny"}).model
    shares = common.unet_forward_flops_by_block(model, 16, 2)
    blocks = len(model.unet.block_out_channels)
    assert set(shares) == {f"down_blocks.{i}" for i in range(blocks)} | {f"up_blocks.{i}" for i in range(blocks)} | {"mid_block"}
    assert all(share > 0 for share in shares.values())
    assert 0.9 < sum(shares.values()) < 1  # conv_in, conv_out and the time embedding hold the rest
    assert shares == common.unet_forward_flops_by_block(model, 16, 4)  # shares do not depend on the batch


def test_high_frequency_share_of_noise_and_of_smooth_latents():
    import torch

    share = _load("vae_judge").high_frequency_share
    noise = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    frequencies = torch.fft.fftfreq(16)
    radius = (frequencies.view(-1, 1) ** 2 + frequencies.view(1, -1) ** 2).sqrt()
    expected = (radius > 0.25).sum().item() / (16 * 16 - 1)  # flat spectrum over every bin but the mean's
    assert share(noise) == pytest.approx(expected, abs=0.02)
    y = torch.arange(16.0).view(-1, 1).expand(16, 16)
    smooth = torch.cos(2 * torch.pi * y / 16).expand(2, 4, 16, 16) + 3.0  # one cycle per image, plus an offset
    assert share(smooth) < 1e-6
    assert share(smooth + 0.5 * torch.cos(torch.pi * y).expand(2, 4, 16, 16)) > 0.1  # the finest stripes


def test_latent_blur_keeps_flat_latents_and_damps_the_finest_stripes():
    import torch

    blur = _load("vae_judge").gaussian_blur
    flat = torch.full((2, 4, 8, 8), 3.0)
    torch.testing.assert_close(blur(flat, 0.7), flat)
    stripes = torch.cos(torch.pi * torch.arange(8.0)).view(1, 1, 8, 1).expand(1, 4, 8, 8)  # +1, -1, +1, ...
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.5**2))
    damping = (taps[1] - 2 * taps[0]) / taps.sum()  # the centre row against its two neighbours of the other sign
    torch.testing.assert_close(blur(stripes, 0.5)[:, :, 1:-1], damping * stripes[:, :, 1:-1])
    with pytest.raises(ValueError, match="the blur's sigma must be positive, got 0"):
        blur(flat, 0)


def test_gpu_peak_is_known_for_h100_and_h200_only_by_name():
    common = _load("common")
    assert common.bf16_peak_flops("cpu") is None
    assert common.bf16_peak_flops("cpu", override_tflops=989) == 989e12
    names = dict(common.BF16_DENSE_PEAK_FLOPS)
    assert names["H100"] == names["H200"] == 989e12


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--steps", "3", "--log-every", "2"], "multiples of --log-every"),
        (["--warmup-steps", "0"], "--warmup-steps must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-samples", "8", "--batch-size", "16"], "--num-samples"),
    ],
)
def test_train_benchmark_rejects_bad_settings_before_any_work(arguments, message):
    train = _load("train_throughput")
    with pytest.raises(SystemExit, match=message):
        train.resolve_settings(train.parse_args(arguments))


def test_sample_benchmark_rejects_bad_settings_before_any_work():
    sample = _load("sample_throughput")
    with pytest.raises(SystemExit, match="--steps must be at least 2"):
        sample.resolve_settings(sample.parse_args(["--steps", "1"]))
    with pytest.raises(SystemExit, match="--scheduler must be one of"):
        sample.resolve_settings(sample.parse_args(["--scheduler", "heun"]))


def test_a_recorded_run_goes_to_the_end_of_its_part(tmp_path):
    common = _load("common")

    def report(name: str, device: str):
        machine = {**common.machine_info("cpu"), "device": device}  # a GPU run, as far as the part goes
        return common.Report(name, machine, "abc1234", "cmd", [], ["side"], [["ours"]], date="2026-01-01 00:00")

    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n## CPU\n\n### old cpu run\n\ntext\n\n## GPU\n\nNo GPU runs yet.\n")
    report("new cpu run", "cpu").append_to(str(path))
    report("new gpu run", "cuda").append_to(str(path))
    report("steps table", "cpu").append_to(str(path), part="Quality")
    report("second cpu run", "cpu").append_to(str(path))
    headings = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert headings == [
        "# Results",
        "## CPU", "### old cpu run", "### new cpu run (2026-01-01 00:00)", "### second cpu run (2026-01-01 00:00)",
        "## GPU", "### new gpu run (2026-01-01 00:00)",
        "## Quality", "### steps table (2026-01-01 00:00)",
    ]
    assert "No GPU runs yet.\n\n### new gpu run" in path.read_text()
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(FileNotFoundError, match="create it with its header first"):
        report("x", "cpu").append_to(str(tmp_path / "missing.md"))


def test_small_preset_freezes_the_text_encoder_as_the_recipe_does_unless_overridden():
    bench = _load("train_throughput")
    from latentdiff.config import load_config

    settings = bench.PRESETS["small"]

    def text_encoder_trained(*extra: str) -> bool:
        overrides = bench.shared_overrides(settings, "/nonexistent/vae", extra)
        return load_config(bench.config_files(settings), overrides).model.text_encoder.train

    assert load_config(bench.config_files(settings)).model.text_encoder.train  # the shapes model trains it
    assert not text_encoder_trained()
    assert text_encoder_trained("model.text_encoder.train=true")
    # the default's token mixing starts at step 1,700; a benchmark of a few steps times it from the first
    assert load_config(bench.config_files(settings)).train.token_mixing_from_step > settings.warmup_steps + settings.steps
    overrides = bench.shared_overrides(settings, "/nonexistent/vae", ("model.text_encoder.train=true",))
    assert load_config(bench.config_files(settings), overrides).train.token_mixing_from_step == 0


def test_caption_gap_names_a_folder_that_is_not_a_pipeline(tmp_path, monkeypatch, capsys):
    caption_gap = _load("caption_gap")
    monkeypatch.syspath_prepend(BENCH)  # as when run as a script: bench/common.py beside it
    monkeypatch.setattr(sys, "argv", ["caption_gap.py", str(tmp_path)])
    with pytest.raises(SystemExit):
        caption_gap.main()
    assert "is not a pipeline folder (no model_index.json)" in capsys.readouterr().err


def test_fit_decoder_trains_only_the_decoder_and_writes_a_pipeline_diffusers_loads(tmp_path, monkeypatch):
    import torch

    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import tiny_components

    script = _load("fit_decoder")
    source, out = tmp_path / "pipeline", tmp_path / "fitted"
    LatentPipeline(**tiny_components()).save_pretrained(source)
    before = LatentPipeline.from_pretrained(source)
    arguments = [str(source), "--config", os.path.join(REPO_ROOT, "configs", "tiny.yaml"), "--out", str(out),
                 "--pairs", "16", "--steps", "60", "--batch-size", "8", "--learning-rate", "1e-3"]
    monkeypatch.setattr(sys, "argv", ["fit_decoder.py", *arguments])
    script.main()
    after = LatentPipeline.from_pretrained(out)

    def changed(module_before, module_after):
        return any(not torch.equal(a, b) for a, b in zip(module_before.state_dict().values(), module_after.state_dict().values()))

    assert changed(before.vae.decoder, after.vae.decoder) and changed(before.vae.post_quant_conv, after.vae.post_quant_conv)
    assert not changed(before.vae.encoder, after.vae.encoder) and not changed(before.vae.quant_conv, after.vae.quant_conv)
    assert not changed(before.unet, after.unet) and not changed(before.text_encoder, after.text_encoder)
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor

    # The fit lowers the decoder's loss on what it was fitted to: the encoder's latents of the training images.
    images, _ = script.training_images(os.path.join(REPO_ROOT, "configs", "tiny.yaml"), [], 16, seed=0)
    targets = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        clean = script.encoder_latents(before, images, 16)
        losses = [torch.nn.functional.mse_loss(pipe.decode_latents_to_image(clean), targets).item() for pipe in (before, after)]
    assert losses[1] < 0.9 * losses[0]

    # The control (--sampled-share 0) fits the decoder on the encoder's latents alone.
    control = tmp_path / "control"
    monkeypatch.setattr(sys, "argv", ["fit_decoder.py", *arguments[:4], str(control), *arguments[5:], "--sampled-share", "0"])
    script.main()
    assert changed(before.vae.decoder, LatentPipeline.from_pretrained(control).vae.decoder)

    monkeypatch.setattr(sys, "argv", ["fit_decoder.py", *arguments])  # the same --out again: not overwritten
    with pytest.raises(SystemExit):
        script.main()
    valid = dict(pairs=4, steps=1, batch_size=2, min_strength=0.1, max_strength=0.2, sampled_share=0.5, out=str(tmp_path / "new"))
    for bad, message in (({"min_strength": 0.5, "max_strength": 0.2}, "need 0 < --min-strength <= --max-strength <= 1"),
                         ({"steps": 0}, "--steps must be at least 1"),
                         ({"sampled_share": 1.5}, r"--sampled-share must be in \[0, 1\], got 1.5")):
        with pytest.raises(ValueError, match=message):
            script.check_arguments(script.argparse.Namespace(**{**valid, **bad}))


def test_objects_along_sampling_draws_the_evals_images_and_judges_every_step(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from latentdiff.eval.adherence import _sampler, generate_images, image_seed
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import tiny_components

    script = _load("objects_along_sampling")
    folder, out = tmp_path / "pipeline", tmp_path / "out"
    LatentPipeline(**tiny_components()).save_pretrained(folder)
    monkeypatch.setattr(sys, "argv", ["objects_along_sampling.py", str(folder), "--prompt", "a red circle",
                                      "--images-per-prompt", "2", "--steps", "4", "--out", str(out)])
    script.main()
    record = json.loads((out / "along_sampling.json").read_text())
    assert [image["image_index"] for image in record["images"]] == [0, 1]
    for image in record["images"]:
        timesteps = image["timesteps"]
        assert len(timesteps) == 4 and timesteps == sorted(timesteps, reverse=True)
        assert len(image["objects_seen"]) == 4
        settled = image["shapes_settled_from"]
        assert settled is None or settled in timesteps
    assert "of 2 final images hold no object" in capsys.readouterr().out
    # a row per image: the estimates of every other step, then the final image
    assert Image.open(out / "along_sampling.png").size == (3 * script.TILE, 2 * script.TILE)

    # the final image is the eval's image of the same prompt and index
    pipe = LatentPipeline.from_pretrained(folder)
    eval_images = generate_images(pipe, ["a red circle", "a red circle"], steps=4, progress=False)
    with _sampler(pipe, "dpm"):
        _, estimates, final = script.estimates_along_sampling(pipe, "a red circle", image_seed(0, "a red circle", 1), 4)
    assert np.array_equal(final, np.asarray(eval_images[1]))
    assert len(estimates) == 4 and estimates[0].shape == final.shape


def test_shapes_settle_where_every_later_estimate_holds_the_final_shapes():
    settled_from = _load("objects_along_sampling").shapes_settled_from
    timesteps = [900, 600, 300, 100]
    final = ["red square"]
    assert settled_from(timesteps, [[], ["blue square"], ["red circle"], ["red square"]], final) == 100
    assert settled_from(timesteps, [["red circle"], ["blue square"], ["red square"], ["red square"]], final) == 600
    assert settled_from(timesteps, [["red square"]] * 4, final) == 900
    assert settled_from(timesteps, [["red square"]] * 3 + [[]], final) is None
    assert settled_from(timesteps, [["red square"], [], [], []], []) == 600  # empty from 600 on


@pytest.mark.slow
def test_stage1_step_cost_times_each_phase_of_each_variant_side_by_side():
    """bench/stage1_step_cost.py: one row per variant, a time for each of stage 1's three phases, speeds relative to
    the first variant (float32 against bf16 here, as the forty-seventh round compared them)."""
    process = _run("stage1_step_cost.py", "--config", "configs/tiny.yaml", "--variant", "vae_train.mixed_precision=no",
                   "--variant", "vae_train.mixed_precision=bf16", "--steps", "1", "--warmup", "0", "--rounds", "1")
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    rows = [line for line in process.stdout.splitlines() if line.startswith("| vae_train.mixed_precision=")]
    assert len(rows) == 2
    first, second = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    assert first[0].endswith("=no") and first[-1] == "1.00x / 1.00x / 1.00x"
    assert all(float(ms) > 0 for ms in first[1:4] + second[1:4])
    # one speed per phase (the tiny config's steps take a few milliseconds, too few to check the rounded ratios)
    speeds = [float(speed.rstrip("x")) for speed in second[-1].split(" / ")]
    assert len(speeds) == 3 and all(speed > 0 for speed in speeds)


@pytest.mark.slow
def test_stage2_step_cost_times_the_token_loss_eager_compiled_and_recomputed_side_by_side():
    """bench/stage2_step_cost.py: a row per variant and one for the eager token-loss variant's maps recomputed by
    hooks (none for the compiled one, whose hooks set per step would recompile it), the compiled variant's first step
    reported apart, and the token loss's targets timed for both."""
    loss = "train.attention_localization_weight=0.5 train.cache=true"
    compiled = f"{loss} train.compile=true train.compile_backend=aot_eager"
    process = _run("stage2_step_cost.py", "--config", "configs/tiny.yaml", "--variant", loss, "--variant", compiled,
                   "--steps", "2", "--warmup", "1", "--rounds", "1", "--recomputed-maps")
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in process.stdout.splitlines()
            if line.startswith("| train.")]
    step_rows = [row for row in rows if len(row) == 6]
    assert [row[0] for row in step_rows] == [loss, compiled, f"{loss}, maps recomputed by hooks"]
    assert step_rows[0][-1] == "1.00x" and all(float(row[1]) > 0 for row in step_rows)
    assert [row[0] for row in rows if len(row) == 3] == [loss, compiled]  # the targets, cold and cached
    first_step = re.search(rf"^{re.escape(compiled)}: the first step, compiling, took ([0-9.]+) s$", process.stdout, re.M)
    assert first_step and float(first_step.group(1)) > 0
