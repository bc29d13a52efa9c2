"""What the pipelines get from building on Diffusers' own classes (a LoRA made with peft, loaded with
`load_lora_weights`), the model's saved sampling defaults, folders saved before the pipelines had an
`image_encoder` slot, and the range checks of every pipeline's sampling arguments. Tiny random components."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from latentdiff import LatentImg2ImgPipeline, LatentInpaintPipeline, LatentOutpaintPipeline, LatentPipeline
from latentdiff.testing import tiny_components

IMAGE = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
MASK = PIL.Image.fromarray(np.where(np.arange(32)[None, :] < 16, 255, 0).astype(np.uint8).repeat(32, 0))
# The arguments each pipeline needs besides the prompt.
NEEDS = {
    LatentPipeline: {},
    LatentImg2ImgPipeline: {"image": IMAGE},
    LatentInpaintPipeline: {"image": IMAGE, "mask_image": MASK},
    LatentOutpaintPipeline: {"image": IMAGE, "right": 8},
}


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)


def make(pipeline_class, parts):
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **NEEDS[type(pipe)], **kwargs}
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images


class Calls:
    """Counts forward calls of the U-Net, the text encoder and the autoencoder."""

    def __init__(self, pipe):
        self.unet = 0
        modules = [pipe.unet, pipe.text_encoder] + ([pipe.vae] if pipe.vae is not None else [])
        self.hooks = [module.register_forward_pre_hook(self.count(module is pipe.unet)) for module in modules]
        self.total = 0

    def count(self, is_unet):
        def hook(*args):
            self.total += 1
            self.unet += is_unet

        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------------------------
# Built on Diffusers' own classes
# --------------------------------------------------------------------------------------------------------------


def test_the_pipelines_are_diffusers_stable_diffusion_pipelines():
    assert issubclass(LatentPipeline, StableDiffusionPipeline)
    assert issubclass(LatentImg2ImgPipeline, StableDiffusionImg2ImgPipeline)
    assert issubclass(LatentInpaintPipeline, StableDiffusionInpaintPipeline)
    assert issubclass(LatentOutpaintPipeline, LatentInpaintPipeline)
    for loader in ("load_lora_weights", "load_textual_inversion", "load_ip_adapter", "from_single_file"):
        assert all(hasattr(cls, loader) for cls in NEEDS), loader


def test_a_lora_made_with_peft_loads_with_load_lora_weights_and_changes_the_output(tmp_path):
    peft = pytest.importorskip("peft")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    parts = tiny_components(seed=0)
    # A LoRA on the U-Net's attention projections, with non-zero weights (peft starts B at zero otherwise).
    torch.manual_seed(1)
    lora_unet = UNet2DConditionModel.from_config(parts["unet"].config)
    lora_unet.load_state_dict(parts["unet"].state_dict())
    lora_unet.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True)

    pipe = make(LatentPipeline, parts)
    plain = run(pipe, guidance_scale=3.0)
    pipe.load_lora_weights(tmp_path)
    with_lora = run(pipe, guidance_scale=3.0)
    assert np.abs(with_lora - plain).max() > 1e-2
    half = run(pipe, guidance_scale=3.0, cross_attention_kwargs={"scale": 0.5})
    assert np.abs(half - plain).max() > 1e-3 and np.abs(half - with_lora).max() > 1e-3

    # The same LoRA in stock Diffusers gives the same images.
    stock = StableDiffusionPipeline(**tiny_components(seed=0), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(tmp_path)
    expected = stock("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(with_lora, expected, atol=1e-5)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(run(pipe, guidance_scale=3.0), plain, atol=1e-6)


def test_custom_timesteps_as_in_diffusers(components):
    from diffusers import DDPMScheduler

    parts = dict(components, scheduler=DDPMScheduler.from_config(components["scheduler"].config))
    ours = run(make(LatentPipeline, parts), num_inference_steps=None, timesteps=[901, 501, 1])
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    theirs = sd("a red circle", timesteps=[901, 501, 1], output_type="np", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(ours, theirs.images, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The model's sampling defaults, and folders saved before
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline_class", list(NEEDS))
def test_a_call_without_steps_or_guidance_uses_the_model_defaults_then_diffusers(components, pipeline_class):
    pipe = make(pipeline_class, components)
    full_strength = {"strength": 1.0} if pipeline_class is LatentImg2ImgPipeline else {}
    calls = Calls(pipe)
    run(pipe, num_inference_steps=None, **full_strength)  # Diffusers' own default: 50 steps
    assert calls.unet == 50
    pipe.sampling_defaults = {"num_inference_steps": 3, "guidance_scale": 2.5}
    calls.unet = 0
    from_defaults = run(pipe, num_inference_steps=None, **full_strength)
    calls.remove()
    assert calls.unet == 3  # guidance on: both halves in one batch
    np.testing.assert_array_equal(from_defaults, run(pipe, num_inference_steps=3, guidance_scale=2.5, **full_strength))
    assert np.abs(from_defaults - run(pipe, num_inference_steps=3, guidance_scale=1.0, **full_strength)).max() > 1e-4


def test_a_folder_saved_before_the_image_encoder_slot_loads(components, tmp_path):
    """Folders exported before the pipelines were built on StableDiffusionPipeline list no `image_encoder`."""
    pipe = make(LatentPipeline, components)
    pipe.sampling_defaults = {"guidance_scale": 3.0, "num_inference_steps": 2}
    pipe.save_pretrained(tmp_path, model_card=False)
    index_path = tmp_path / "model_index.json"
    model_index = json.loads(index_path.read_text())
    del model_index["image_encoder"]
    index_path.write_text(json.dumps(model_index))
    loaded = LatentPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_defaults == {"guidance_scale": 3.0, "num_inference_steps": 2}
    np.testing.assert_allclose(run(loaded, num_inference_steps=None), run(pipe, guidance_scale=3.0), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Range checks: one clear ValueError each, before any model runs
# --------------------------------------------------------------------------------------------------------------

COMMON_BAD = [
    ({"guidance_scale": float("nan")}, r"`guidance_scale` has to be a finite number >= 0"),
    ({"guidance_scale": float("inf")}, r"`guidance_scale` has to be a finite number >= 0"),
    ({"guidance_scale": -1.0}, r"`guidance_scale` has to be a finite number >= 0"),
    ({"guidance_scale": "7"}, r"`guidance_scale` has to be a finite number >= 0"),
    ({"eta": 5.0}, r"`eta` has to be a number in \[0, 1\]"),
    ({"eta": -0.1}, r"`eta` has to be a number in \[0, 1\]"),
    ({"guidance_rescale": 2.0}, r"`guidance_rescale` has to be a number in \[0, 1\]"),
    ({"num_inference_steps": True}, "`num_inference_steps` has to be a positive integer"),
    ({"num_inference_steps": 2.5}, "`num_inference_steps` has to be a positive integer"),
    ({"num_inference_steps": -3}, "`num_inference_steps` has to be a positive integer"),
    ({"guidance_interval": (600, 0)}, r"`guidance_interval` has to be None or a pair \(low, high\) of training timesteps"),
    ({"guidance_interval": (-1, 600)}, r"`guidance_interval` has to be None or a pair"),
    ({"guidance_interval": (0, float("nan"))}, r"`guidance_interval` has to be None or a pair"),
    ({"guidance_interval": "0 600"}, r"`guidance_interval` has to be None or a pair"),
]
PER_PIPELINE_BAD = [
    (LatentPipeline, {"height": -64}, r"`height` and `width` have to be divisible by 2 .* positive"),
    (LatentPipeline, {"width": 0, "height": 32}, None),  # 0 means "the default size", as in Diffusers
    (LatentPipeline, {"width": 31}, r"`height` and `width` have to be divisible by 2"),
    (LatentImg2ImgPipeline, {"strength": 1.5}, r"`strength` has to be a number in \[0.0, 1.0\]"),
    (LatentImg2ImgPipeline, {"strength": float("nan")}, r"`strength` has to be a number in \[0.0, 1.0\]"),
    (LatentImg2ImgPipeline, {"image": np.zeros((32, 32, 3), np.uint8)}, r"hold floats in \[0, 1\]"),
    (LatentInpaintPipeline, {"strength": -0.5}, r"`strength` has to be a number in \(0.0, 1.0\]"),
    (LatentOutpaintPipeline, {"strength": 2}, r"`strength` has to be a number in \(0.0, 1.0\]"),
    (LatentOutpaintPipeline, {"height": -64, "right": 0}, "`height` has to be an integer multiple of 2"),
    (LatentOutpaintPipeline, {"mask_image": MASK}, "outpainting makes its own mask"),
]


@pytest.mark.parametrize("pipeline_class", list(NEEDS))
@pytest.mark.parametrize("kwargs, match", COMMON_BAD)
def test_sampling_arguments_out_of_range_are_clear_errors(components, pipeline_class, kwargs, match):
    if pipeline_class is LatentImg2ImgPipeline and "guidance_rescale" in kwargs:
        with pytest.raises(TypeError, match=r"unexpected keyword arguments \['guidance_rescale'\]"):
            run(make(pipeline_class, components), **kwargs)  # Diffusers' img2img has none, and would ignore it
        return
    check_rejected(make(pipeline_class, components), kwargs, match)


@pytest.mark.parametrize("pipeline_class, kwargs, match", PER_PIPELINE_BAD)
def test_each_pipeline_checks_its_own_arguments(components, pipeline_class, kwargs, match):
    pipe = make(pipeline_class, components)
    if match is None:
        assert run(pipe, **kwargs).shape == (1, 32, 32, 3)
    else:
        check_rejected(pipe, kwargs, match)


def check_rejected(pipe, kwargs, match):
    calls = Calls(pipe)
    try:
        with pytest.raises(ValueError, match=match):
            run(pipe, **kwargs)
    finally:
        calls.remove()
    assert calls.total == 0


class GuidanceByTimestep:
    """Records, after each U-Net call, its timestep and the guidance scale the step used."""

    def __init__(self):
        self.seen = []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.seen.append((int(timestep), pipe.guidance_scale))
        return callback_kwargs


@pytest.mark.parametrize("pipeline_class", list(NEEDS))
def test_guidance_interval_guides_only_the_timesteps_inside_it(components, pipeline_class, tmp_path):
    pipe = make(pipeline_class, components)
    full_strength = {"strength": 1.0} if pipeline_class is LatentImg2ImgPipeline else {}
    record = GuidanceByTimestep()
    run(pipe, num_inference_steps=4, guidance_scale=5.0, guidance_interval=(0, 600), callback_on_step_end=record,
        **full_strength)
    timesteps = [t for t, _ in record.seen]
    assert len(timesteps) == 4 and min(timesteps) <= 600 < max(timesteps)
    assert record.seen == [(t, 5.0 if t <= 600 else 1.0) for t in timesteps]
    assert pipe.guidance_scale == 5.0  # after the call, the call's scale again

    # An interval holding every timestep is plain guidance; one holding none is the conditional prediction alone.
    everywhere = run(pipe, guidance_scale=5.0, guidance_interval=(0, 1000), **full_strength)
    np.testing.assert_array_equal(everywhere, run(pipe, guidance_scale=5.0, **full_strength))
    nowhere = run(pipe, guidance_scale=5.0, guidance_interval=(1000, 2000), **full_strength)
    np.testing.assert_allclose(nowhere, run(pipe, guidance_scale=1.0, **full_strength), atol=1e-5)
    assert np.abs(nowhere - everywhere).max() > 1e-4

    # The model's saved interval is the default of a call, through save_pretrained / from_pretrained.
    if pipeline_class is LatentPipeline:
        pipe.sampling_defaults = {"guidance_scale": 5.0, "guidance_interval": [0, 600]}
        pipe.save_pretrained(tmp_path, model_card=False)
        loaded = LatentPipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        saved = GuidanceByTimestep()
        run(loaded, num_inference_steps=4, callback_on_step_end=saved)
        assert saved.seen == record.seen


@pytest.mark.parametrize("pipeline_class", list(NEEDS))
def test_the_model_negative_prompt_is_the_default_and_an_empty_one_turns_it_off(components, pipeline_class, tmp_path):
    pipe = make(pipeline_class, components)
    full_strength = {"strength": 1.0} if pipeline_class is LatentImg2ImgPipeline else {}
    plain = run(pipe, guidance_scale=5.0, **full_strength)
    steered = run(pipe, guidance_scale=5.0, negative_prompt="a shape", **full_strength)
    assert np.abs(steered - plain).max() > 1e-4
    pipe.sampling_defaults = {"guidance_scale": 5.0, "negative_prompt": "a shape"}
    np.testing.assert_array_equal(run(pipe, **full_strength), steered)
    np.testing.assert_array_equal(run(pipe, negative_prompt="", **full_strength), plain)
    # embeddings given for the negative side win over the saved text
    embeds, negative_embeds = pipe.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="a blue square")
    by_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=2,
                     output_type="np", generator=torch.Generator().manual_seed(0), **NEEDS[pipeline_class],
                     **full_strength).images
    by_text = run(pipe, negative_prompt="a blue square", **full_strength)
    np.testing.assert_allclose(by_embeds, by_text, atol=1e-5)
    # saved with the model and read back
    if pipeline_class is LatentPipeline:
        pipe.save_pretrained(tmp_path, model_card=False)
        loaded = LatentPipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.sampling_defaults["negative_prompt"] == "a shape"
        np.testing.assert_array_equal(run(loaded), steered)


@pytest.mark.parametrize("pipeline_class", list(NEEDS))
def test_the_negative_prompt_carry_appends_each_prompts_match_to_the_negative_prompt(components, pipeline_class, tmp_path):
    """`negative_prompt_carry`: the part of each prompt that the regular expression matches is appended to the negative
    prompt, so "a red circle on a white background" is guided away from "a shape on a white background"; a prompt
    without a match keeps the negative prompt as it is; the model's saved carry is a call's default."""
    pipe = make(pipeline_class, components)
    carry = " on an? \\w+ background$"
    full_strength = {"strength": 1.0} if pipeline_class is LatentImg2ImgPipeline else {}

    def draw(prompts, **kwargs):
        return pipe(prompts, num_inference_steps=2, output_type="np", guidance_scale=5.0,
                    generator=[torch.Generator().manual_seed(0) for _ in prompts], **NEEDS[pipeline_class],
                    **full_strength, **kwargs).images

    prompts = ["a red circle on a white background", "a red circle"]
    carried = draw(prompts, negative_prompt="a shape", negative_prompt_carry=carry)
    by_hand = draw(prompts, negative_prompt=["a shape on a white background", "a shape"])
    np.testing.assert_allclose(carried, by_hand, atol=1e-6)
    plain = draw(prompts, negative_prompt="a shape")
    assert np.abs(carried[0] - plain[0]).max() > 1e-4 and np.abs(carried[1] - plain[1]).max() < 1e-6
    assert pipe.carried_negative_prompt(prompts, "a shape") == "a shape"  # no carry outside a call
    with pytest.raises(ValueError, match="`negative_prompt_carry` '\\(' is not a valid regular expression"):
        draw(prompts, negative_prompt_carry="(")
    if pipeline_class is LatentPipeline:  # saved with the model: the default of a call; "" turns it off
        pipe.sampling_defaults = {"guidance_scale": 5.0, "negative_prompt": "a shape", "negative_prompt_carry": carry}
        pipe.save_pretrained(tmp_path, model_card=False)
        pipe = LatentPipeline.from_pretrained(tmp_path)
        pipe.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(draw(prompts), carried, atol=1e-6)
        np.testing.assert_allclose(draw(prompts, negative_prompt_carry=""), plain, atol=1e-6)


def test_guidance_between_zero_and_one_is_accepted(components):
    """Below 1 guidance is off (Diffusers' convention), so 0 <= w <= 1 all give the unguided image."""
    pipe = make(LatentPipeline, components)
    images = [run(pipe, guidance_scale=value) for value in (0.0, 0.5, 1.0)]
    assert all(np.array_equal(images[0], image) for image in images) and math.isfinite(float(images[0].mean()))


# --------------------------------------------------------------------------------------------------------------
# One seeded generation path
# --------------------------------------------------------------------------------------------------------------


def test_one_seed_gives_one_image_from_the_command_line_the_eval_and_the_training_grid(components, tmp_path):
    from latentdiff.cli import main
    from latentdiff.config import SampleConfig
    from latentdiff.eval.adherence import evaluate_adherence
    from latentdiff.eval.suite import shapes_suite
    from latentdiff.sampling import sample_images

    pipe = make(LatentPipeline, components)
    pipe.sampling_defaults = {"guidance_scale": 3.0, "num_inference_steps": 2}
    pipe.save_pretrained(tmp_path / "model", model_card=False)
    spec = shapes_suite(())[5]

    # The eval draws each image with a seed of its own and records it; guidance: the model's own.
    results = evaluate_adherence(pipe, [spec], images_per_prompt=1, steps=2, scheduler="ddim", progress=False)
    seed = results.records[0]["seed"]
    assert results.settings["guidance_scale"] == 3.0
    from_eval = np.asarray(results.images[0])

    # `latentdiff generate MODEL PROMPT -n 1 --seed SEED` redraws it (steps and guidance: the model's own).
    argv = ["generate", str(tmp_path / "model"), spec.prompt, "-n", "1", "--seed", str(seed), "--scheduler", "ddim",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    from_cli = np.asarray(PIL.Image.open(next((tmp_path / "out").glob("000-*.png"))))

    # So does the training grid, whose image j of a prompt has seed `sample.seed + j`, among other prompts.
    sample = SampleConfig(prompts=("two blue squares", spec.prompt), images_per_prompt=1, num_inference_steps=2,
                          guidance_scale=3.0, scheduler="ddim", seed=seed)
    from_grid = np.asarray(sample_images(pipe, list(sample.prompts), sample)[1])

    np.testing.assert_array_equal(from_cli, from_eval)
    np.testing.assert_array_equal(from_grid, from_eval)
    other = evaluate_adherence(pipe, [spec], images_per_prompt=1, steps=2, scheduler="ddim", seed=1, progress=False)
    assert np.abs(np.asarray(other.images[0]).astype(int) - from_eval).max() > 0  # another seed, another image
