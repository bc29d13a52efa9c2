"""The ``latentdiff`` command line: help for every argument, --version, img2img, interpolate and --dtype.
Tiny random components, 2 steps."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentPipeline, __version__
from latentdiff.cli import build_parser, main

SIZE = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from latentdiff.testing import tiny_components

    folder = tmp_path_factory.mktemp("model")
    pipe = LatentPipeline(**tiny_components(seed=0))
    pipe.sampling_defaults = {"guidance_scale": 3.0}
    pipe.save_pretrained(folder, model_card=False)
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "image.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def test_every_command_and_argument_has_help():
    parser = build_parser()
    assert parser.description.count(". ") == 0 and parser.description.endswith(".")  # one sentence
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helped = {choice.dest for choice in subparsers._choices_actions if choice.help}
    commands = _subcommands(parser)
    assert helped == set(commands)
    expected = {"generate", "img2img", "inpaint", "outpaint", "interpolate", "demo", "eval", "push", "shapes", "config"}
    assert expected <= set(commands)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing
    for name in ("generate", "img2img", "inpaint", "outpaint", "interpolate", "demo", "eval"):
        options = {option for action in commands[name]._actions for option in action.option_strings}
        assert {"--dtype", "--device"} <= options, name


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"latentdiff {__version__}"


def test_img2img_command(model, image_path, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["img2img", str(model), str(image_path), "a blue square", "--strength", "0.5", "-n", "2",
            "--steps", "4", "--scheduler", "ddim", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    files = sorted(out.glob("*.png"))
    assert [path.name for path in files] == ["000-a-blue-square.png", "001-a-blue-square.png"]
    # Image 1 is the pipeline's image for seed 3 + 1, with the model's own guidance (3.0).
    from latentdiff.pipelines import LatentImg2ImgPipeline
    from latentdiff.models.schedulers import scheduler_from_name

    pipe = LatentImg2ImgPipeline.from_pretrained(model)
    pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
    expected = pipe("a blue square", image=Image.open(image_path).convert("RGB"), strength=0.5, num_inference_steps=4,
                    guidance_scale=3.0, generator=torch.Generator().manual_seed(4)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(files[1])), np.asarray(expected))
    assert "(seed 4)" in capsys.readouterr().out


def test_img2img_bad_strength_is_one_line(model, image_path, tmp_path, capsys):
    assert main(["img2img", str(model), str(image_path), "x", "--strength", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--strength must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interpolate_strip_and_gif(model, tmp_path):
    strip = tmp_path / "strip.png"
    common = ["--steps", "2", "--guidance", "1", "--frames", "3"]
    assert main(["interpolate", str(model), "a red circle", "--seeds", "5", "6", "--out", str(strip), *common]) == 0
    assert Image.open(strip).size == (3 * SIZE, SIZE)
    # The ends are the pipeline's own images of the two seeds (LatentPipeline.interpolate).
    pipe = LatentPipeline.from_pretrained(model)
    frames = pipe.interpolate("a red circle", 5, 6, num_frames=3, num_inference_steps=2, guidance_scale=1.0)
    np.testing.assert_array_equal(np.asarray(Image.open(strip))[:, :SIZE], np.asarray(frames[0]))

    gif = tmp_path / "walk.gif"
    assert main(["interpolate", str(model), "a red circle", "--seeds", "5", "6", "7", "--out", str(gif), *common]) == 0
    animation = Image.open(gif)
    assert animation.n_frames == 5  # 3 + 3 frames, the shared middle one once
    assert animation.size == (SIZE, SIZE)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds", "1"], "--seeds needs at least two seeds"),
        (["--frames", "1"], "--frames must be at least 2"),
        (["--out", "walk.mp4"], "--out must end in .png"),
    ],
)
def test_interpolate_bad_input(model, tmp_path, capsys, extra, message):
    assert main(["interpolate", str(model), "a red circle", *extra]) == 2
    assert message in capsys.readouterr().err


def test_dtype_loads_the_pipeline_in_that_precision(model):
    from latentdiff.cli import _load_pipeline

    args = build_parser().parse_args(["generate", str(model), "x", "--dtype", "bfloat16", "--device", "cpu"])
    pipe = _load_pipeline(LatentPipeline, args)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert image.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(image.images).all()
