"""LatentImg2ImgPipeline (SDEdit): parity with StableDiffusionImg2ImgPipeline, strength, input checks,
component sharing with LatentPipeline. Tiny random components, 2 denoising steps."""

from __future__ import annotations


import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from latentdiff import LatentImg2ImgPipeline, LatentPipeline
from latentdiff.schedulers import scheduler_from_name

PROMPTS = ["a red circle at the top left", "two blue squares"]


@pytest.fixture(scope="module")
def components():
    from latentdiff.testing import tiny_components

    return tiny_components(seed=0)


def make_pipe(components, scheduler: str = "ddim", pipeline_class=LatentImg2ImgPipeline):
    parts = dict(components, scheduler=scheduler_from_name(scheduler, components["scheduler"].config))
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd(components, scheduler: str = "ddim") -> StableDiffusionImg2ImgPipeline:
    parts = dict(components, scheduler=scheduler_from_name(scheduler, components["scheduler"].config))
    pipe = StableDiffusionImg2ImgPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int, size: tuple[int, int] = (32, 32)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def run(pipe, prompt, image, seed=0, **kwargs):
    # strength 0.5 of 4 steps: 2 denoising steps
    kwargs = {"strength": 0.5, "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(prompt, image=image, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize(
    "scheduler, guidance_scale, case",
    [
        ("ddim", 1.0, "one image per prompt"),
        ("ddim", 7.5, "one image, several outputs"),
        ("dpm", 1.0, "one image, several outputs"),
        ("dpm", 7.5, "one image per prompt"),
    ],
)
def test_matches_stable_diffusion_img2img(components, scheduler, guidance_scale, case):
    if case == "one image per prompt":
        prompt, image, kwargs = PROMPTS, [random_image(1), random_image(2)], {}
    else:
        prompt, image, kwargs = PROMPTS[0], random_image(1), {"num_images_per_prompt": 2}
    ours = run(make_pipe(components, scheduler), prompt, image, guidance_scale=guidance_scale, **kwargs)
    theirs = run(make_sd(components, scheduler), prompt, image, guidance_scale=guidance_scale, **kwargs)
    assert ours.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # two different images


def test_strength_zero_returns_the_reconstruction(components):
    pipe = make_pipe(components)
    image = random_image(3)
    output = run(pipe, "a red circle", image, strength=0.0, output_type="pt")
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        latents = pipe.encode_image_to_latents(pixels, torch.Generator().manual_seed(0))
        reconstruction = pipe.image_processor.postprocess(pipe.decode_latents_to_image(latents), output_type="pt")
    torch.testing.assert_close(output, reconstruction, rtol=0, atol=1e-6)
    # More strength moves further from the input.
    changed = run(pipe, "a red circle", image, strength=1.0, output_type="pt")
    assert (changed - reconstruction).abs().mean() > 1e-3


def test_pixel_space_strength_zero_returns_the_input():
    from latentdiff.config import load_config
    from latentdiff.models import build_components
    from latentdiff.testing import tiny_components

    config = load_config(overrides={"model.preset": "tiny", "model.pixel_space": True})
    torch.manual_seed(0)
    parts = dict(build_components(config.model, 32), scheduler=tiny_components(seed=0)["scheduler"])
    pipe = make_pipe(parts)
    image = random_image(4)
    output = run(pipe, "a red circle", image, strength=0.0, output_type="pil")[0]
    np.testing.assert_array_equal(np.asarray(output), np.asarray(image))
    noised = run(pipe, "a red circle", image, strength=0.5)
    assert noised.shape == (1, 32, 32, 3) and np.abs(noised[0] - np.asarray(image) / 255).mean() > 1e-2


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.5", None])
def test_strength_outside_unit_interval_is_an_error(components, strength):
    pipe = make_pipe(components)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"`strength` has to be a number in \[0.0, 1.0\]"):
        pipe("a red circle", image=random_image(0), strength=strength, num_inference_steps=2)
    hook.remove()
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": None}, "`image` is required"),
        ({"image": "cat.png"}, "`image` has to be a PIL image"),
        ({"image": random_image(0, (33, 32))}, "`image` height and width have to be divisible by 2"),
        ({"image": [random_image(0)] * 3}, "`image` holds 3 images but the prompt batch has 2"),
        ({"image": torch.zeros(1, 5, 32, 32)}, "`image` tensors need 3 \\(RGB\\) or 4 \\(latents\\) channels"),
        ({"image": random_image(0).convert("RGBA")}, "`image` has to be RGB, got PIL mode"),
        ({"image": np.zeros((32, 32, 4))}, "`image` arrays need 3"),
        ({"negative_prompt": ["x", "y", "z"]}, "`negative_prompt` has 3 entries"),
        ({"num_inference_steps": 0}, "`num_inference_steps`"),
    ],
)
def test_bad_input_is_a_clear_error(components, kwargs, match):
    pipe = make_pipe(components)
    kwargs = {"image": random_image(0), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(PROMPTS, **kwargs)


def test_latents_as_image_skip_the_encoder(components):
    pipe = make_pipe(components)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    output = run(pipe, "a red circle", latents, strength=0.0, output_type="latent")
    torch.testing.assert_close(output, latents, rtol=0, atol=0)


def test_shares_components_with_the_text_to_image_pipeline(components, tmp_path):
    text_to_image = make_pipe(components, pipeline_class=LatentPipeline)
    image_to_image = LatentImg2ImgPipeline.from_pipe(text_to_image)
    assert image_to_image.unet is text_to_image.unet and image_to_image.vae is text_to_image.vae
    also = LatentImg2ImgPipeline(**text_to_image.components)
    assert also.text_encoder is text_to_image.text_encoder

    text_to_image.save_pretrained(tmp_path, model_card=False)
    loaded = LatentImg2ImgPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(
        run(loaded, "a red circle", random_image(5)), run(image_to_image, "a red circle", random_image(5)), atol=1e-6
    )
