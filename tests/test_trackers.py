"""Trackers record the run: the whole configuration as hyperparameters, and image grids through
Accelerate's tracker API (TensorBoard read back from its event files, wandb in offline mode, and a
tracker of our own written on Accelerate's ``GeneralTracker``)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from PIL import Image

from latentdiff.config import ConfigError, config_to_dict, load_config
from latentdiff.testing import tensorboard_records
from latentdiff.trainer.loop import check_report_to, init_trackers, log_images, make_accelerator, tracker_hyperparameters


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def test_hyperparameters_are_the_whole_config_as_overrides():
    config = load_config(
        overrides={"model.preset": "tiny", "train.max_steps": 7, "data.shapes.holdout": ["purple triangle"]}
    )
    flat = tracker_hyperparameters(config)
    assert sorted(flat) == sorted(_leaves(config_to_dict(config)))
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
    assert flat["train.max_steps"] == 7
    assert flat["model.vae.pretrained"] == "null"
    assert flat["data.shapes.holdout"] == "[purple triangle]"
    # Written back as command-line overrides, the hyperparameters rebuild the same configuration.
    assert load_config(overrides=[f"{key}={value}" for key, value in flat.items()]) == config


def test_report_to_names_a_tracker_that_is_installed(monkeypatch):
    assert check_report_to("none") is None and check_report_to(None) is None
    assert check_report_to("tensorboard") == "tensorboard"
    with pytest.raises(ConfigError, match="report_to='tensorbord' is not a tracker; expected one of .*tensorboard"):
        check_report_to("tensorbord")
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match="the wandb package is not installed"):
        check_report_to("wandb")


def _grid(width: int = 24, height: int = 16) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tensorboard_gets_the_config_scalars_and_the_grid(tmp_path):
    config = load_config(overrides={"model.preset": "tiny", "output_dir": str(tmp_path), "train.max_steps": 5})
    accelerator = make_accelerator(config, "no", 1, "tensorboard", "ldm")
    init_trackers(accelerator, "latentdiff-test", config)
    accelerator.log({"loss": 0.25}, step=3)
    log_images(accelerator, "validation", _grid(), 3)
    accelerator.end_training()

    hyperparameters, images, scalars = tensorboard_records(tmp_path / "logs" / "ldm")
    assert hyperparameters == tracker_hyperparameters(config)
    assert images == {"validation": [(3, 24, 16)]}
    assert scalars["loss"] == [(3, 0.25)]


class RecordingTracker(GeneralTracker):
    """A tracker of our own on Accelerate's API: keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.configuration, self.images, self.logs = None, {}, []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.configuration = dict(values)

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        for tag, images in values.items():
            self.images.setdefault(tag, []).append((step, [np.asarray(image).shape for image in images]))


def test_any_accelerate_tracker_with_log_images_gets_config_and_images(tmp_path):
    config = load_config(overrides={"model.preset": "tiny", "output_dir": str(tmp_path)})
    recording = RecordingTracker()
    accelerator = Accelerator(log_with=[recording])
    init_trackers(accelerator, "latentdiff-test", config)
    log_images(accelerator, "samples", _grid(), 8)
    accelerator.end_training()
    assert recording.configuration == tracker_hyperparameters(config)
    assert recording.images == {"samples": [(8, [(16, 24, 3)])]}


def test_wandb_offline_run_records_config_and_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(overrides={"model.preset": "tiny", "output_dir": str(tmp_path), "train.max_steps": 9})
    accelerator = make_accelerator(config, "no", 1, "wandb", "ldm")
    init_trackers(accelerator, "latentdiff-test", config)
    log_images(accelerator, "validation", _grid(), 4)
    accelerator.end_training()
    import wandb

    wandb.teardown()  # stops wandb's service process, which writes the run file in the background

    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    # The run's record file holds every hyperparameter by name (wandb has no public reader of
    # offline runs); the image is saved as a media file of the run.
    records = b"".join(Path(path).read_bytes() for path in glob.glob(os.path.join(run, "run-*.wandb")))
    missing = [key for key in tracker_hyperparameters(config) if key.encode() not in records]
    assert not missing, missing
    (image_path,) = glob.glob(os.path.join(run, "files", "media", "images", "validation_*.png"))
    assert Image.open(image_path).size == (24, 16)


@pytest.mark.parametrize("precision, flash_after", [("bf16", False), ("no", True)])
def test_bf16_training_on_cpu_runs_attention_with_the_math_kernel(tmp_path, precision, flash_after):
    """make_accelerator on a CPU under bf16 turns torch's CPU flash attention off for the process (its bf16 backward
    made bf16 training slower than float32: ``use_math_attention_on_cpu``); in float32 it is left as it was."""
    from accelerate.state import AcceleratorState

    config = load_config(overrides={"model.preset": "tiny", "output_dir": str(tmp_path)})
    before = torch.backends.cuda.flash_sdp_enabled()  # torch's default is on; whatever ran before in this process,
    torch.backends.cuda.enable_flash_sdp(True)        # the test starts from it and gives the setting back
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        make_accelerator(config, precision, 1, None, "ldm")
        assert torch.backends.cuda.flash_sdp_enabled() is flash_after
    finally:
        torch.backends.cuda.enable_flash_sdp(before)
        AcceleratorState._reset_state(reset_partial_state=True)
