"""LatentInpaintPipeline: known pixels kept exactly, plain blending and RePaint resampling (schedule and U-Net call
count), parity with Diffusers' StableDiffusionInpaintPipeline (4- and 9-channel U-Nets), mask conversion, input
errors, component sharing. Tiny random components (32x32 images, VAE factor 2), 2 to 4 denoising steps."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from latentdiff import LatentInpaintPipeline, LatentPipeline
from latentdiff.pipelines.pipeline_latent_inpaint import feather_alpha, mask_to_tensor, repaint_schedule
from latentdiff.schedulers import scheduler_from_name


@pytest.fixture(scope="module")
def components():
    from latentdiff.testing import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def inpainting_unet(components):
    """A tiny U-Net of the Stable Diffusion inpainting layout: 4 latent + 1 mask + 4 masked-image channels in."""
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9}).eval()


def make_pipe(components, scheduler: str = "ddim", pipeline_class=LatentInpaintPipeline, **replace):
    parts = dict(components, scheduler=scheduler_from_name(scheduler, components["scheduler"].config), **replace)
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int, size: tuple[int, int] = (32, 32)) -> PIL.Image.Image:
    """A random RGB image of `size` = (height, width)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def random_mask(seed: int, size: tuple[int, int] = (32, 32), block: int = 1) -> np.ndarray:
    """A random binary mask (True = repaint) of `size`, made of `block` x `block` squares, never empty."""
    rng = np.random.default_rng(seed)
    cells = rng.random((size[0] // block, size[1] // block)) < 0.4
    cells[rng.integers(cells.shape[0]), rng.integers(cells.shape[1])] = True
    return np.kron(cells, np.ones((block, block), dtype=bool)).astype(bool)


def as_pil(mask: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(mask.astype(np.uint8) * 255)


def run(pipe, prompt, image, mask, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "np", **kwargs}
    return pipe(prompt, image=image, mask_image=mask, generator=torch.Generator().manual_seed(seed), **kwargs).images


class UNetCalls:
    """Counts the U-Net's forward calls (a forward pre-hook)."""

    def __init__(self, unet):
        self.count = 0
        self._hook = unet.register_forward_pre_hook(self._count)

    def _count(self, *args):
        self.count += 1

    def remove(self):
        self._hook.remove()


# --- the known region ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, seed", [((32, 32), 0), ((32, 48), 1), ((48, 16), 2)])
def test_outside_the_mask_the_output_is_the_input_pixel_for_pixel(components, size, seed):
    pipe = make_pipe(components)
    image, mask = random_image(seed, size), random_mask(seed, size)
    output = run(pipe, "a red circle", image, as_pil(mask), seed=seed, output_type="pil")[0]
    result, original = np.asarray(output), np.asarray(image)
    assert output.size == image.size
    np.testing.assert_array_equal(result[~mask], original[~mask])
    assert np.abs(result[mask].astype(int) - original[mask]).mean() > 5  # the masked part was repainted


def test_known_pixels_kept_for_arrays_batches_and_several_images_per_prompt(components):
    """Float arrays in, float arrays out, one image and mask per prompt, two images per prompt, RePaint on."""
    pipe = make_pipe(components)
    images = [np.asarray(random_image(seed, (32, 48))).astype(np.float32) / 255 for seed in (3, 4)]
    masks = [random_mask(seed, (32, 48)) for seed in (3, 4)]
    output = pipe(
        ["a red circle", "a blue square"],
        image=images,
        mask_image=[mask.astype(np.float32) for mask in masks],
        num_inference_steps=3,
        jump_length=1,
        jump_n_sample=2,
        guidance_scale=2.0,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(seed) for seed in range(4)],
        output_type="np",
    ).images
    assert output.shape == (4, 32, 48, 3)
    for index in range(4):
        image, mask = images[index // 2], masks[index // 2]
        np.testing.assert_array_equal(output[index][~mask], image[~mask])
    assert np.abs(output[0] - output[1]).max() > 1e-3  # two different images for one prompt


def test_feather_blends_only_a_band_of_the_given_width(components):
    pipe = make_pipe(components)
    image = random_image(5)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 10:22] = True
    sharp = run(pipe, "a red circle", image, as_pil(mask), output_type="pil")[0]
    soft = run(pipe, "a red circle", image, as_pil(mask), output_type="pil", feather=3)[0]
    original, sharp, soft = np.asarray(image), np.asarray(sharp), np.asarray(soft)

    alpha = feather_alpha(torch.from_numpy(mask)[None, None].float(), 3)[0, 0].numpy()
    band = (alpha > 0) & ~mask
    np.testing.assert_array_equal(soft[alpha == 0], original[alpha == 0])  # beyond the band: exact
    np.testing.assert_array_equal(soft[mask], sharp[mask])  # inside the mask: the generated image
    assert np.abs(soft[band].astype(int) - original[band]).max() > 0  # the band is blended
    # The ramp: 1 - d / (feather + 1) at Euclidean distance d from the mask.
    assert alpha[7, 15] == pytest.approx(0.75) and alpha[5, 15] == pytest.approx(0.25) and alpha[4, 15] == 0
    assert alpha[4, 6] == 0 and 0 < alpha[6, 8] < alpha[7, 9] < 1


# --- plain blending, RePaint resampling ---------------------------------------------------------------------------


def test_repaint_schedule_pattern_and_call_count():
    assert repaint_schedule(4, jump_length=3, jump_n_sample=2) == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert repaint_schedule(5) == [0, 1, 2, 3, 4, 5]
    assert repaint_schedule(3, jump_length=1, jump_n_sample=2) == [0, 1, 0, 1, 2, 1, 2, 3]
    for steps in range(1, 13):
        for jump_length in range(1, 6):
            for jump_n_sample in range(1, 5):
                schedule = repaint_schedule(steps, jump_length, jump_n_sample)
                moves = list(zip(schedule, schedule[1:]))
                assert schedule[0] == 0 and schedule[-1] == steps
                assert all(after == before + 1 or after == before - jump_length for before, after in moves)
                documented = steps + (jump_n_sample - 1) * jump_length * len(range(0, steps - jump_length, jump_length))
                assert sum(after > before for before, after in moves) == documented
    with pytest.raises(ValueError, match="`jump_length` has to be a positive integer"):
        repaint_schedule(4, jump_length=0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_no_resampling_is_plain_blending_as_in_diffusers(components, scheduler):
    """jump_length=1, jump_n_sample=1 is plain blending: the latents of Diffusers' StableDiffusionInpaintPipeline with
    the same 4-channel U-Net (its nearest-downsampled mask equals our max-pooled one on a latent-aligned mask)."""
    image, mask = random_image(6), as_pil(random_mask(6, block=2))
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "latent"}
    ours = run(make_pipe(components, scheduler), "a red circle", image, mask, jump_length=1, jump_n_sample=1, **kwargs)
    longer_jumps = run(make_pipe(components, scheduler), "a red circle", image, mask, jump_length=2, **kwargs)
    sd = StableDiffusionInpaintPipeline(
        **make_pipe(components, scheduler).components,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    theirs = sd(
        "a red circle", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(longer_jumps, ours, rtol=0, atol=0)  # jump_n_sample=1: no jump, whatever the length


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(4, 1, 2), (4, 2, 3)])
def test_resampling_takes_the_documented_number_of_unet_calls(components, steps, jump_length, jump_n_sample):
    pipe = make_pipe(components)
    image, mask = random_image(7), as_pil(random_mask(7))
    calls = UNetCalls(pipe.unet)
    plain = run(pipe, "a red circle", image, mask, num_inference_steps=steps)
    plain_calls, calls.count = calls.count, 0
    resampled = run(
        pipe, "a red circle", image, mask, num_inference_steps=steps, jump_length=jump_length,
        jump_n_sample=jump_n_sample, guidance_scale=3.0,  # guidance: one batched call for both halves
    )
    calls.remove()
    assert plain_calls == steps
    assert calls.count == steps + (jump_n_sample - 1) * jump_length * len(range(0, steps - jump_length, jump_length))
    assert np.abs(resampled - plain).max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm"])
def test_resampling_is_deterministic_given_the_generator(components, scheduler):
    pipe = make_pipe(components, scheduler)
    image, mask = random_image(8), as_pil(random_mask(8))
    kwargs = {"num_inference_steps": 3, "jump_length": 1, "jump_n_sample": 2}
    first = run(pipe, "a red circle", image, mask, seed=1, **kwargs)
    again = run(pipe, "a red circle", image, mask, seed=1, **kwargs)
    other = run(pipe, "a red circle", image, mask, seed=2, **kwargs)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_jump_back_draws_from_the_forward_process(components):
    """q(z_t | z_s): mean sqrt(abar_t / abar_s) z_s, variance 1 - abar_t / abar_s, between DDIM's timesteps."""
    pipe = make_pipe(components)
    pipe.scheduler.set_timesteps(10)
    timesteps = pipe.scheduler.timesteps
    latents = torch.full((64, 4, 16, 16), 0.5)
    jumped = pipe.jump_back(latents, 7, 2, timesteps, 0, torch.Generator().manual_seed(0))
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    ratio = (alphas_cumprod[timesteps[2]] / alphas_cumprod[timesteps[7]]).item()
    assert jumped.mean().item() == pytest.approx(0.5 * ratio**0.5, abs=0.015)  # 4 standard errors
    assert jumped.var().item() == pytest.approx(1 - ratio, rel=2e-2)


# --- the inpainting U-Net ---------------------------------------------------------------------------------------


def test_inpainting_unet_matches_diffusers_and_keeps_known_pixels(components, inpainting_unet):
    image, mask = random_image(9), random_mask(9)
    pipe = make_pipe(components, unet=inpainting_unet)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 2.0}
    calls = UNetCalls(pipe.unet)
    ours = run(pipe, "a red circle", image, as_pil(mask), output_type="latent", **kwargs)
    calls.remove()
    sd = StableDiffusionInpaintPipeline(
        **pipe.components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.set_progress_bar_config(disable=True)
    theirs = sd(
        "a red circle", image=image, mask_image=as_pil(mask), generator=torch.Generator().manual_seed(0),
        output_type="latent", **kwargs,
    ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert calls.count == 2

    output = np.asarray(run(pipe, "a red circle", image, as_pil(mask), output_type="pil", **kwargs)[0])
    np.testing.assert_array_equal(output[~mask], np.asarray(image)[~mask])


def test_pixel_space_model_keeps_known_pixels():
    from latentdiff.config import load_config
    from latentdiff.models import build_components
    from latentdiff.testing import tiny_components

    config = load_config(overrides={"model.preset": "tiny", "model.pixel_space": True})
    torch.manual_seed(0)
    parts = dict(build_components(config.model, 16), scheduler=tiny_components(seed=0)["scheduler"])
    pipe = make_pipe(parts)
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    image, mask = random_image(10, (16, 16)), random_mask(10, (16, 16))
    output = np.asarray(run(pipe, "a red circle", image, as_pil(mask), output_type="pil", jump_n_sample=2)[0])
    np.testing.assert_array_equal(output[~mask], np.asarray(image)[~mask])
    assert np.abs(output[mask].astype(int) - np.asarray(image)[mask]).mean() > 5


# --- masks -------------------------------------------------------------------------------------------------------


def test_mask_conversion_rules():
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    expected = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]]]])
    assert torch.equal(mask_to_tensor(PIL.Image.fromarray(gray)), expected)  # threshold 0.5: 128 / 255 and up
    assert torch.equal(mask_to_tensor(gray), expected)  # uint8 arrays / 255
    assert torch.equal(mask_to_tensor(gray.astype(np.float32) / 255), expected)
    assert torch.equal(mask_to_tensor(torch.from_numpy(gray > 127)[None]), expected)  # booleans, (C, H, W)
    assert torch.equal(mask_to_tensor(gray, threshold=0.25), torch.tensor([[[[0.0, 1.0, 1.0, 1.0]]]]))
    # RGB (PIL and arrays) -> ITU-R 601-2 luma: pure green (0.587) is repainted, pure red (0.299) is kept
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 0, 0], rgb[0, 1, 1] = 255, 255
    for mask in (PIL.Image.fromarray(rgb), rgb, PIL.Image.fromarray(rgb).convert("RGBA")):
        assert torch.equal(mask_to_tensor(mask), torch.tensor([[[[0.0, 1.0]]]]))
    assert torch.equal(mask_to_tensor(torch.from_numpy(rgb).permute(2, 0, 1)), torch.tensor([[[[0.0, 1.0]]]]))
    assert mask_to_tensor([gray, gray]).shape == (2, 1, 1, 4)


def test_non_binary_and_rgb_masks_give_the_thresholded_result(components):
    pipe = make_pipe(components)
    image, mask = random_image(11), random_mask(11)
    soft = np.where(mask, 0.8, 0.3).astype(np.float32)  # not binary: thresholded at 0.5
    rgb = PIL.Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2))
    binary = run(pipe, "a red circle", image, as_pil(mask))
    np.testing.assert_array_equal(run(pipe, "a red circle", image, soft), binary)
    np.testing.assert_array_equal(run(pipe, "a red circle", image, rgb), binary)


def test_empty_mask_returns_the_input_with_a_warning(components):
    pipe = make_pipe(components)
    image = random_image(12)
    calls = UNetCalls(pipe.unet)
    with pytest.warns(UserWarning, match="empty"):
        output = run(pipe, "a red circle", image, PIL.Image.new("L", (32, 32)), output_type="pil")
    calls.remove()
    assert calls.count == 0
    np.testing.assert_array_equal(np.asarray(output[0]), np.asarray(image))


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_image": PIL.Image.new("L", (32, 24))}, r"`mask_image` is 24x32 \(HxW\) but `image` is 32x32"),
        ({"mask_image": np.zeros((32, 32, 2), dtype=np.float32)}, "has 2 channels"),
        ({"mask_image": np.full((32, 32), 2.0)}, r"float values have to lie in \[0, 1\]"),
        ({"mask_image": np.ones((32, 32), dtype=np.int64)}, "integer masks have to be uint8"),
        ({"mask_image": "mask.png"}, "`mask_image` has to be a PIL image"),
        ({"mask_image": None}, "`mask_image` is required"),
        ({"mask_image": [PIL.Image.new("L", (32, 32))] * 3}, "`mask_image` holds 3 masks but the prompt batch has 2"),
        ({"mask_threshold": 0}, r"`mask_threshold` has to be a number in \(0, 1\]"),
        ({"image": random_image(0, (31, 32))}, "`image` height and width have to be divisible by 2"),
        ({"image": random_image(0).convert("RGBA")}, "`image` has to be RGB"),
        ({"image": np.zeros((32, 32, 3), dtype=np.uint8)}, r"hold floats in \[0, 1\]"),
        ({"image": torch.full((3, 32, 32), -1.0)}, r"`image` values have to lie in \[0, 1\]"),
        ({"strength": 0.0}, r"`strength` has to be a number in \(0.0, 1.0\]"),
        ({"strength": 0.2}, "leaves no denoising step"),
        ({"feather": -1}, "`feather` has to be a non-negative integer"),
        ({"jump_length": 0}, "`jump_length` has to be a positive integer"),
        ({"jump_n_sample": 2, "jump_length": 2}, r"RePaint resampling needs `jump_length` < 2"),
        ({"latents": torch.zeros(2, 4, 8, 8)}, r"`latents` has to have shape \(2, 4, 16, 16\)"),
        ({"negative_prompt": ["x", "y", "z"]}, "`negative_prompt` has 3 entries"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_model_runs(components, kwargs, match):
    pipe = make_pipe(components)
    calls = UNetCalls(pipe.unet)
    kwargs = {"image": random_image(0), "mask_image": as_pil(random_mask(0)), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(["a red circle", "a blue square"], **kwargs)
    calls.remove()
    assert calls.count == 0


def test_resampling_refuses_schedulers_it_cannot_jump_back_in(components):
    pipe = make_pipe(components, "euler")
    with pytest.raises(ValueError, match="RePaint resampling .* not with EulerDiscreteScheduler"):
        run(pipe, "a red circle", random_image(0), as_pil(random_mask(0)), jump_n_sample=2, num_inference_steps=3)


def test_unet_with_unsuitable_channels_is_refused(components):
    unet = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 5})
    pipe = make_pipe(components, unet=unet)
    with pytest.raises(ValueError, match="inpainting needs 4 .* or 9"):
        run(pipe, "a red circle", random_image(0), as_pil(random_mask(0)))


# --- construction ------------------------------------------------------------------------------------------------


def test_builds_from_a_text_to_image_pipeline_and_loads_its_folder(components, tmp_path):
    text_to_image = make_pipe(components, pipeline_class=LatentPipeline)
    inpaint = LatentInpaintPipeline.from_pipe(text_to_image)
    assert inpaint.unet is text_to_image.unet and inpaint.vae is text_to_image.vae
    also = LatentInpaintPipeline(**text_to_image.components)
    assert also.text_encoder is text_to_image.text_encoder and also.scheduler is text_to_image.scheduler

    text_to_image.save_pretrained(tmp_path, model_card=False)
    loaded = LatentInpaintPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    image, mask = random_image(13), as_pil(random_mask(13))
    np.testing.assert_allclose(run(loaded, "a circle", image, mask), run(inpaint, "a circle", image, mask), atol=1e-6)


def test_seam_measures():
    from latentdiff.inpaint_metrics import border_gradient, mask_border, seam_score

    mask = np.zeros((8, 8), dtype=bool)
    mask[:, 4:] = True  # touches the image's right edge, which is no border
    border = mask_border(mask)[0]
    assert border.sum() == 16 and border[:, 3:5].all()  # the two columns on either side of the boundary
    step = np.zeros((8, 8, 3))
    step[:, 4:] = 1.0  # a seam of full height in every channel: central differences of 0.5 on both sides
    assert border_gradient(step, mask) == pytest.approx(np.sqrt(3 * 0.25))
    assert border_gradient(np.full((8, 8, 3), 0.3), mask) == 0.0

    real = np.zeros((8, 8, 3))
    real[:, 4:, 0] = 0.5  # real content crossing the border: half the step, in one channel
    assert seam_score(step, mask, real) == pytest.approx(np.sqrt(3 * 0.25) / 0.25)
    assert seam_score([step, real], [mask, mask], [real, real]) == pytest.approx((np.sqrt(0.75) + 0.25) / 2 / 0.25)
    with pytest.raises(ValueError, match="no gradient along the given borders"):
        seam_score(step, mask, np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="pass one mask per image"):
        border_gradient([step, step, step], [mask, mask])
    with pytest.raises(ValueError, match="no border"):
        border_gradient(step, np.zeros((8, 8), dtype=bool))


def test_inpaint_quality_benchmark_runs_end_to_end(components, tmp_path):
    """The code path of bench/inpaint_quality.py on a tiny random pipeline (its numbers mean nothing here)."""
    import json
    import runpy
    import sys

    folder = tmp_path / "pipeline"
    make_pipe(components, pipeline_class=LatentPipeline).save_pretrained(folder, model_card=False)
    out = tmp_path / "result.json"
    script = str(Path(__file__).parents[1] / "bench" / "inpaint_quality.py")
    argv = [script, str(folder), "--n", "3", "--steps", "2", "--jump-length", "1", "--jump-n-sample", "2",
            "--guidance", "1", "--grid-scenes", "2", "--device", "cpu", "--out", str(out)]
    old_argv, sys.argv = sys.argv, argv
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = old_argv
    report = json.loads(out.read_text())
    assert report["settings"]["n"] == 3 and len(report["scenes"]) == 3
    for method in ("plain", "repaint"):
        assert 0 <= report[method]["success_rate"] <= 1 and report[method]["border_gradient"] > 0
    for scene in report["scenes"]:
        assert scene["prompt"].startswith(f"a {scene['new']['color']} {scene['new']['shape']} ")
        assert scene["new"]["color"] != scene["old"]["color"] and scene["new"]["shape"] != scene["old"]["shape"]
    assert (tmp_path / "result_grid.png").is_file()
