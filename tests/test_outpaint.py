"""LatentOutpaintPipeline: canvas geometry (sides, target size, non-square), the middle equal to the input, the fills,
RePaint and the inpainting U-Net, input errors, component sharing, copies of the inpainting code; the `inpaint` and
`outpaint` commands. Tiny random components (VAE factor 2), 2 or 3 denoising steps."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff import LatentInpaintPipeline, LatentOutpaintPipeline, LatentPipeline
from latentdiff.schedulers import scheduler_from_name


@pytest.fixture(scope="module")
def components():
    from latentdiff.testing import tiny_components

    return tiny_components(seed=0)


def make_pipe(components, scheduler: str = "ddim", pipeline_class=LatentOutpaintPipeline, **replace):
    parts = dict(components, scheduler=scheduler_from_name(scheduler, components["scheduler"].config), **replace)
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int, size: tuple[int, int] = (32, 32)) -> PIL.Image.Image:
    """A random RGB image of `size` = (height, width)."""
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def run(pipe, image, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "pil", **kwargs}
    return pipe("a red circle", image=image, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_64x64_by_32_left_and_right_gives_64x128_whose_middle_is_the_input(components):
    pipe = make_pipe(components)
    image = random_image(0, (64, 64))
    output = run(pipe, image, left=32, right=32)[0]
    assert (output.height, output.width) == (64, 128)
    result = np.asarray(output)
    np.testing.assert_array_equal(result[:, 32:96], np.asarray(image))
    assert np.abs(result[:, :32].astype(int) - result[:, 32:33]).mean() > 5  # the new area was painted


@pytest.mark.parametrize(
    "sides, expected",
    [
        ({"top": 8, "bottom": 0, "left": 0, "right": 24}, (8, 0, 0, 24)),  # (top, bottom, left, right)
        ({"height": 38, "width": 32}, (2, 4, 0, 0)),  # a target size: centred, the odd latent cell at the bottom
        ({"height": 40, "width": 44}, (4, 4, 6, 6)),
    ],
)
def test_non_square_canvases_keep_the_input_in_place(components, sides, expected):
    pipe = make_pipe(components)
    image = random_image(1)
    top, bottom, left, right = expected
    output = np.asarray(run(pipe, image, **sides)[0])
    assert output.shape == (32 + top + bottom, 32 + left + right, 3)
    np.testing.assert_array_equal(output[top : top + 32, left : left + 32], np.asarray(image))


def test_fills_and_the_mask_of_the_new_area(components):
    pipe = make_pipe(components)
    pixels = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    edge, mask = pipe.extend_canvas(pixels, 4, 2, 0, 6, fill="edge")
    assert edge.shape == (1, 3, 14, 14) and mask.shape == (1, 1, 14, 14)
    assert torch.equal(mask[0, 0, :8, 4:12], torch.zeros(8, 8)) and mask.sum() == 14 * 14 - 64
    for fill in ("edge", "blur", "noise"):
        canvas, _ = pipe.extend_canvas(pixels, 4, 2, 0, 6, fill=fill, generator=torch.Generator().manual_seed(1))
        assert torch.equal(canvas[..., :8, 4:12], pixels)  # the image itself, exactly
        assert 0 <= canvas.min() and canvas.max() <= 1
    assert torch.equal(edge[..., :8, :4], pixels[..., :, :1].expand(-1, -1, -1, 4))  # the left edge, stretched
    assert torch.equal(edge[..., 8:, 4:12], pixels[..., -1:, :].expand(-1, -1, 6, -1))  # the bottom edge, stretched
    blur, _ = pipe.extend_canvas(pixels, 4, 2, 0, 6, fill="blur")
    new = mask[0, 0].bool()
    assert blur[..., new].std() < edge[..., new].std()  # only the edge colours carry over, smoothed
    noise_a, _ = pipe.extend_canvas(pixels, 4, 2, 0, 6, fill="noise", generator=torch.Generator().manual_seed(1))
    noise_b, _ = pipe.extend_canvas(pixels, 4, 2, 0, 6, fill="noise", generator=torch.Generator().manual_seed(2))
    noise_again, _ = pipe.extend_canvas(pixels, 4, 2, 0, 6, fill="noise", generator=torch.Generator().manual_seed(1))
    assert torch.equal(noise_a, noise_again) and not torch.equal(noise_a, noise_b)


def test_the_fill_shapes_the_result_below_full_strength(components):
    pipe = make_pipe(components)
    image = random_image(2)
    kwargs = {"left": 16, "strength": 0.5, "num_inference_steps": 4, "output_type": "np"}
    edge, noise = run(pipe, image, fill="edge", **kwargs), run(pipe, image, fill="noise", **kwargs)
    assert np.abs(edge[0, :, :16] - noise[0, :, :16]).mean() > 0.02
    np.testing.assert_array_equal(edge[0, :, 16:], noise[0, :, 16:])


def test_outpainting_is_inpainting_of_the_extended_canvas_with_repaint(components):
    outpaint = make_pipe(components)
    inpaint = make_pipe(components, pipeline_class=LatentInpaintPipeline)
    image = random_image(3)
    kwargs = {"num_inference_steps": 3, "jump_length": 1, "jump_n_sample": 2, "output_type": "np"}
    kwargs["guidance_scale"] = 2.0
    calls = []
    hook = outpaint.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    ours = run(outpaint, image, right=16, top=4, **kwargs)
    hook.remove()
    assert len(calls) == 3 + 1 * 1 * len(range(0, 3 - 1, 1))  # the documented count of repaint_schedule

    pixels = inpaint.pixel_processor.preprocess(image)
    canvas, mask = outpaint.extend_canvas(pixels, 0, 16, 4, 0, fill="edge")
    expected = inpaint(
        "a red circle", image=canvas, mask_image=mask, generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    np.testing.assert_array_equal(ours, expected)


def test_inpainting_unet_path_keeps_the_middle(components):
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9}).eval()
    pipe = make_pipe(components, "dpm", unet=unet)
    image = random_image(4)
    output = np.asarray(run(pipe, image, bottom=16, fill="blur")[0])
    assert output.shape == (48, 32, 3)
    np.testing.assert_array_equal(output[:32], np.asarray(image))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"left": 3}, r"`left`=3 is not a multiple of 2"),
        ({"left": -2}, "`left` has to be a non-negative integer"),
        ({}, "Nothing to outpaint"),
        ({"left": 2, "width": 40}, "either the pixels to add .* or a target size"),
        ({"height": 16}, r"`height` has to be an integer multiple of 2 .* at least the image's height 32"),
        ({"width": 35}, "`width` has to be an integer multiple of 2"),
        ({"left": 2, "fill": "mirror"}, "`fill` has to be one of"),
        ({"left": 2, "image": random_image(0).convert("L")}, "`image` has to be RGB"),
        ({"left": 2, "image": random_image(0, (31, 32))}, "divisible by 2"),
        ({"left": 2, "latents": torch.zeros(1, 4, 16, 16)}, r"`latents` has to have shape \(1, 4, 16, 17\)"),
        ({"left": 2, "jump_n_sample": 2, "jump_length": 2}, "RePaint resampling needs `jump_length` < 2"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_model_runs(components, kwargs, match):
    pipe = make_pipe(components)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        run(pipe, **{"image": random_image(0), **kwargs})
    hook.remove()
    assert calls == []


def test_builds_from_a_text_to_image_pipeline(components):
    text_to_image = make_pipe(components, pipeline_class=LatentPipeline)
    outpaint = LatentOutpaintPipeline.from_pipe(text_to_image)
    assert outpaint.unet is text_to_image.unet and outpaint.vae is text_to_image.vae
    also = LatentOutpaintPipeline(**text_to_image.components)
    assert also.text_encoder is text_to_image.text_encoder


# --- the commands ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_folder(components, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    make_pipe(components, pipeline_class=LatentPipeline).save_pretrained(folder, model_card=False)
    return folder


def test_inpaint_and_outpaint_commands(pipeline_folder, tmp_path, capsys):
    from latentdiff.cli import main

    image_path, mask_path = tmp_path / "image.png", tmp_path / "mask.png"
    image = random_image(5)
    image.save(image_path)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 10:30] = 255
    PIL.Image.fromarray(mask).save(mask_path)
    common = ["--steps", "3", "--guidance", "1", "--device", "cpu"]

    inpainted = tmp_path / "inpainted"
    assert main(["inpaint", str(pipeline_folder), str(image_path), str(mask_path), "a blue square",
                 "--repaint-jumps", "1", "--repaint-samples", "2", "-n", "2", "--out", str(inpainted), *common]) == 0
    files = sorted(inpainted.glob("*.png"))
    assert [path.name for path in files] == ["000-a-blue-square.png", "001-a-blue-square.png"]
    for path in files:
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(path))[mask == 0], np.asarray(image)[mask == 0])

    outpainted = tmp_path / "outpainted"
    assert main(["outpaint", str(pipeline_folder), str(image_path), "a blue square", "--left", "8", "--right", "8",
                 "--fill", "blur", "--repaint-samples", "2", "--out", str(outpainted), *common]) == 0
    (result,) = [np.asarray(PIL.Image.open(path)) for path in outpainted.glob("*.png")]
    assert result.shape == (32, 48, 3)
    np.testing.assert_array_equal(result[:, 8:40], np.asarray(image))
    assert "000-a-blue-square.png" in capsys.readouterr().out

    # Bad input: one line on stderr, exit status 2.
    assert main(["outpaint", str(pipeline_folder), str(image_path), "x", "--left", "3", "--out", str(outpainted),
                 *common]) == 2
    assert "`left`=3 is not a multiple of 2" in capsys.readouterr().err
    assert main(["inpaint", str(pipeline_folder), str(image_path), str(tmp_path / "none.png"), "x", *common]) == 2
    assert "MASK: no image file" in capsys.readouterr().err
