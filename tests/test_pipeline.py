"""LatentPipeline (text-to-image): parity with StableDiffusionPipeline, loading and saving, input checks,
seed interpolation, scheduler names and the `generate` command. Tiny random components, 2 steps."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from latentdiff import LatentPipeline
from latentdiff.hub import UnsafeWeightsError
from latentdiff.schedulers import SCHEDULER_NAMES, scheduler_class, scheduler_from_name

PROMPTS = ["a red circle at the top left", "two blue squares"]


@pytest.fixture(scope="module")
def components():
    from latentdiff.testing import tiny_components

    return tiny_components(seed=0)


def make_pipe(components, scheduler: str = "ddim", pipeline_class=LatentPipeline, **extra):
    """A pipeline over the shared modules with its own scheduler instance (DPM-Solver keeps state)."""
    parts = dict(components, scheduler=scheduler_from_name(scheduler, components["scheduler"].config), **extra)
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd(components, scheduler: str = "ddim") -> StableDiffusionPipeline:
    parts = dict(components, scheduler=scheduler_from_name(scheduler, components["scheduler"].config))
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt=PROMPTS, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def pixel_components():
    """Tiny components of a pixel-space model: no autoencoder, a 3-channel U-Net on 32x32 images."""
    from latentdiff.config import load_config
    from latentdiff.models import build_components
    from latentdiff.testing import tiny_components

    config = load_config(overrides={"model.preset": "tiny", "model.pixel_space": True})
    torch.manual_seed(0)
    parts = build_components(config.model, 32)
    parts["scheduler"] = tiny_components(seed=0)["scheduler"]
    return parts


# --------------------------------------------------------------------------------------------
# Parity with diffusers.StableDiffusionPipeline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler, guidance_scale, extra",
    [
        ("ddim", 1.0, {}),
        ("ddim", 7.5, {}),
        ("dpm", 1.0, {}),
        ("dpm", 7.5, {"negative_prompt": ["blurry", "a green triangle"]}),
    ],
)
def test_matches_stable_diffusion(components, scheduler, guidance_scale, extra):
    kwargs = {"guidance_scale": guidance_scale, "num_images_per_prompt": 2, **extra}
    ours = run(make_pipe(components, scheduler), **kwargs)
    theirs = run(make_sd(components, scheduler), **kwargs)
    assert ours.shape == (4, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert ours.std() > 0.01  # not a constant image


def test_same_seed_same_images_different_seed_different_images(components):
    pipe = make_pipe(components, "dpm")
    first, again, other = run(pipe, seed=1), run(pipe, seed=1), run(pipe, seed=2)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2


def test_prompt_changes_the_image_and_embeds_give_the_same_result(components):
    pipe = make_pipe(components)
    red, blue = run(pipe, "a red circle"), run(pipe, "a blue square")
    assert np.abs(red - blue).max() > 1e-3
    embeds, negative = pipe.encode_prompt("a red circle", pipe.device, 1, True)
    from_embeds = run(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_allclose(from_embeds, red, atol=1e-6)


def test_output_types_and_tuple(components):
    pipe = make_pipe(components)
    images = run(pipe, "a red circle", output_type="pil")
    assert len(images) == 1 and images[0].size == (32, 32)
    latents = run(pipe, "a red circle", output_type="latent")
    assert latents.shape == (1, 4, 16, 16)
    (as_tuple,) = pipe("a red circle", num_inference_steps=2, output_type="np", return_dict=False,
                       generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(as_tuple, run(pipe, "a red circle"))


def test_callback_on_step_end_sees_every_step(components):
    pipe = make_pipe(components)
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {}

    run(pipe, "a red circle", num_inference_steps=3, callback_on_step_end=callback)
    assert seen == [(0, (1, 4, 16, 16)), (1, (1, 4, 16, 16)), (2, (1, 4, 16, 16))]


def test_shift_factor_is_honoured(components):
    """A VAE config with `shift_factor` decodes `latents / scaling_factor + shift_factor`."""
    pipe = make_pipe(components)
    latents = run(pipe, "a red circle", output_type="latent")
    with torch.no_grad():
        unshifted = pipe.decode_latents_to_image(latents)
        pipe.vae.register_to_config(shift_factor=0.5)
        try:
            decoded = pipe.decode_latents_to_image(latents)
            expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + 0.5).sample
        finally:
            pipe.vae.register_to_config(shift_factor=None)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(decoded, unshifted)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any model runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 33}, "`height` and `width`"),
        ({"width": 30, "height": 31}, "`height` and `width`"),
        ({"num_inference_steps": 0}, "`num_inference_steps`"),
        ({"negative_prompt": ["only one"]}, "`negative_prompt` has 1 entries but the prompt batch has 2"),
        ({"output_type": "jpeg"}, "`output_type`"),
        ({"num_images_per_prompt": 0}, "`num_images_per_prompt`"),
        ({"latents": torch.zeros(2, 4, 8, 8)}, "`latents` has to have shape"),
        ({"generator": [torch.Generator()]}, "`generator` is a list of 1"),
        ({"clip_skip": -1}, "`clip_skip`"),
        ({"prompt_embeds": torch.zeros(2, 77, 32)}, "either `prompt` or `prompt_embeds`"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_model_runs(components, kwargs, match):
    pipe = make_pipe(components)
    calls = []
    hooks = [
        module.register_forward_pre_hook(lambda *args: calls.append(1)) for module in (pipe.unet, pipe.text_encoder)
    ]
    try:
        with pytest.raises(ValueError, match=match):
            pipe(PROMPTS, num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


def test_a_schedule_past_the_training_timesteps_is_a_clear_error(components):
    """SD-style scheduler configs ("leading", steps_offset=1) reach timestep 1000 of 1000 at 1000 steps
    (diffusers issue #10003); the pipeline names the cause instead of an IndexError in the scheduler."""
    from diffusers import DDPMScheduler

    pipe = make_pipe(components)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, steps_offset=1, timestep_spacing="leading")
    steps = pipe.scheduler.config.num_train_timesteps
    with pytest.raises(ValueError, match=r"reaches timestep 1000, past the model's 1000 training timesteps.*steps_offset=0"):
        pipe(PROMPTS, num_inference_steps=steps)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, steps_offset=0)
    pipe.scheduler.set_timesteps(steps)
    assert int(pipe.scheduler.timesteps.max()) == steps - 1  # the whole chain, as bench/quality_vs_steps.py runs it


def test_long_prompt_is_truncated_with_a_warning(components, caplog):
    pipe = make_pipe(components)
    long_prompt = " ".join(["red circle"] * 60)
    with caplog.at_level(logging.WARNING):
        images = run(pipe, long_prompt)
    assert images.shape == (1, 32, 32, 3)
    assert any("truncated" in record.getMessage() and "77 tokens" in record.getMessage() for record in caplog.records)


def test_clip_skip_uses_the_normed_earlier_layer(components):
    # (StableDiffusionPipeline's own clip_skip reads `text_encoder.text_model`, which transformers 5's
    # CLIPTextModel no longer has, so the reference here is computed by hand.)
    pipe = make_pipe(components)
    encoder = components["text_encoder"]
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = pipe.tokenizer([""] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        skipped = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
        unconditional = encoder.final_layer_norm(encoder(empty, output_hidden_states=True).hidden_states[-2])
    ours = run(pipe, clip_skip=1, guidance_scale=5.0)
    by_hand = run(pipe, None, prompt_embeds=skipped, negative_prompt_embeds=unconditional, guidance_scale=5.0)
    np.testing.assert_allclose(ours, by_hand, atol=1e-6)
    assert np.abs(ours - run(pipe, guidance_scale=5.0)).max() > 1e-3


@pytest.mark.parametrize("words_beside", [False, True])
def test_clip_skip_on_an_encoder_without_layers_is_its_output_or_a_clear_error(words_beside):
    from latentdiff.testing import tiny_components

    # the shapes default's encoder: no transformer layers (words beside them need the token mixing)
    overrides = {"model.text_encoder.num_hidden_layers": 0}
    if words_beside:
        overrides |= {"model.text_encoder.token_mixing_width": 2, "model.text_encoder.word_embeddings_in_context": True}
    pipe = make_pipe(tiny_components(seed=0, overrides=overrides))
    np.testing.assert_allclose(run(pipe, clip_skip=0, guidance_scale=5.0), run(pipe, guidance_scale=5.0), atol=1e-6)
    with pytest.raises(ValueError, match=r"`clip_skip`=1 skips more layers than the text encoder has \(0\)"):
        run(pipe, clip_skip=1)


def test_clip_skip_needs_an_encoder_that_exposes_its_layers(components):
    class PlainTextEncoder(torch.nn.Module):
        """Returns hidden states at [0] and nothing else, like a minimal custom text tower."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        @property
        def dtype(self):
            return self.inner.dtype

        @property
        def device(self):
            return self.inner.device

        def forward(self, input_ids, **kwargs):
            return (self.inner(input_ids).last_hidden_state,)

    pipe = make_pipe(components)
    pipe.text_encoder = PlainTextEncoder(components["text_encoder"])
    np.testing.assert_allclose(run(pipe, "a red circle"), run(make_pipe(components), "a red circle"), atol=1e-6)
    with pytest.raises(ValueError, match="`clip_skip`.*PlainTextEncoder"):
        run(pipe, "a red circle", clip_skip=1)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def read_front_matter(path: str) -> dict:
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_reload_same_output_and_stock_diffusers_loads_it(components, tmp_path):
    pipe = make_pipe(components)
    expected = run(pipe)
    pipe.save_pretrained(tmp_path)

    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "LatentPipeline"
    weights = [path.name for path in tmp_path.rglob("*") if path.is_file()]
    assert not any(name.endswith((".bin", ".ckpt", ".pt")) for name in weights)
    assert sum(name.endswith(".safetensors") for name in weights) == 3  # vae, text_encoder, unet

    metadata = read_front_matter(tmp_path / "README.md")
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert {"latentdiff", "diffusers", "text-to-image"} <= set(metadata["tags"])

    reloaded = LatentPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(reloaded), expected, atol=1e-6)

    stock = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    assert isinstance(stock.scheduler, DDIMScheduler)
    np.testing.assert_allclose(run(stock), expected, atol=1e-5)


def test_loads_a_stable_diffusion_folder_with_safety_checker_listed(components, tmp_path, caplog):
    sd = make_sd(components)
    sd.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    # As in the SD 1.x / 2.x repositories (whose folders we do not have): both listed, with a class.
    model_index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    model_index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (tmp_path / "model_index.json").write_text(json.dumps(model_index))

    with caplog.at_level(logging.INFO, logger="latentdiff.hub"):
        pipe = LatentPipeline.from_pretrained(tmp_path)
    assert any("ignoring feature_extractor, safety_checker" in record.getMessage() for record in caplog.records)
    pipe.set_progress_bar_config(disable=True)
    assert not hasattr(pipe, "safety_checker")
    np.testing.assert_allclose(run(pipe), run(sd), atol=1e-5)


def test_pickle_weights_are_refused_unless_allowed(components, tmp_path):
    from safetensors.torch import load_file

    make_pipe(components).save_pretrained(tmp_path, model_card=False)
    unet_weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet_weights), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    unet_weights.unlink()

    with pytest.raises(UnsafeWeightsError, match=r"unet/diffusion_pytorch_model\.bin.*allow_pickle=True"):
        LatentPipeline.from_pretrained(tmp_path)
    pipe = LatentPipeline.from_pretrained(tmp_path, allow_pickle=True)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(pipe), run(make_pipe(components)), atol=1e-6)


def test_missing_component_is_a_clear_error(components, tmp_path):
    make_pipe(components).save_pretrained(tmp_path, model_card=False)
    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match=r"component `unet`.*is missing"):
        LatentPipeline.from_pretrained(tmp_path)

    model_index = json.loads((tmp_path / "model_index.json").read_text())
    del model_index["unet"]
    (tmp_path / "model_index.json").write_text(json.dumps(model_index))
    with pytest.raises(ValueError, match="lists no `unet` component"):
        LatentPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        LatentPipeline.from_pretrained(tmp_path / "vae")


def test_openclip_text_tower_saves_and_loads(tmp_path):
    pytest.importorskip("latentdiff.text_encoders")
    from latentdiff.testing import tiny_components
    from latentdiff.text_encoders import OpenCLIPTextModel

    pipe = make_pipe(tiny_components(seed=0, text_encoder_kind="open_clip"))
    expected = run(pipe)
    pipe.save_pretrained(tmp_path, model_card=False)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["text_encoder"][1] == "OpenCLIPTextModel"

    reloaded = LatentPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.text_encoder, OpenCLIPTextModel)
    np.testing.assert_allclose(run(reloaded), expected, atol=1e-6)


@pytest.mark.parametrize(
    "axis, path_dropout, own_projection", [("features", 0.0, False), ("tokens", 0.25, False), ("tokens", 0.0, True)]
)
def test_word_embeddings_text_encoder_saves_loads_and_skips_layers(tmp_path, axis, path_dropout, own_projection):
    """`word_embeddings_in_context`: the conditioning joins LN(word + position embeddings) and CLIPTextModel's own
    output along `word_embeddings_axis` (each path in its own half of the features with `word_path_own_projection`),
    the U-Net is built that wide, and the pipeline saves, reloads (with the axis, the halves and the training-only
    path dropout, which inference never applies) and `clip_skip`s with it."""
    from transformers import CLIPTextModel

    from latentdiff import CLIPTextModelWithWordEmbeddings
    from latentdiff.testing import tiny_components

    overrides = {
        "model.text_encoder.word_embeddings_in_context": True,
        "model.text_encoder.word_embeddings_axis": axis,
        "model.text_encoder.word_path_dropout": path_dropout,
        "model.text_encoder.word_path_own_projection": own_projection,
    }
    components = tiny_components(seed=0, overrides=overrides)
    encoder = components["text_encoder"]
    width, dim = encoder.config.hidden_size, {"features": -1, "tokens": -2}[axis]
    assert isinstance(encoder, CLIPTextModelWithWordEmbeddings)
    assert components["unet"].config.cross_attention_dim == (2 * width if axis == "features" or own_projection else width)
    plain = CLIPTextModel(encoder.config).eval()
    plain.load_state_dict(encoder.state_dict())  # the same weights: the word path adds no parameter
    pipe = make_pipe(components)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = encoder(ids)[0]
        words, last = context.split([width, width] if axis == "features" else [77, 77], dim=dim)
        if own_projection:  # [word, 0] and [0, state]
            assert not words[..., width:].any() and not last[..., :width].any()
            words, last = words[..., :width], last[..., width:]
        torch.testing.assert_close(last, plain(ids).last_hidden_state)
        torch.testing.assert_close(words, plain.final_layer_norm(plain.embeddings(input_ids=ids)))
        assert torch.equal(encoder(ids, return_dict=False)[0], context)

        empty = pipe.tokenizer([""] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids

        def halves(words, states):
            zero = torch.zeros_like(words)
            return (torch.cat([words, zero], dim=-1), torch.cat([zero, states], dim=-1)) if own_projection else (words, states)

        skipped, unconditional = (
            torch.cat(halves(plain.final_layer_norm(states[0]), plain.final_layer_norm(states[-2])), dim=dim)
            for states in (plain(tokens, output_hidden_states=True).hidden_states for tokens in (ids, empty))
        )
    by_hand = run(pipe, None, prompt_embeds=skipped, negative_prompt_embeds=unconditional, guidance_scale=5.0)
    np.testing.assert_allclose(run(pipe, clip_skip=1, guidance_scale=5.0), by_hand, atol=1e-6)

    expected = run(pipe)
    pipe.save_pretrained(tmp_path, model_card=False)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == ["latentdiff", "CLIPTextModelWithWordEmbeddings"]
    reloaded = LatentPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.text_encoder, CLIPTextModelWithWordEmbeddings)
    assert reloaded.text_encoder.config.word_embeddings_axis == axis
    assert reloaded.text_encoder.config.word_path_dropout == path_dropout
    assert reloaded.text_encoder.config.word_path_own_projection == own_projection
    np.testing.assert_allclose(run(reloaded), expected, atol=1e-6)


@pytest.mark.parametrize("word_path", [False, True])
def test_bidirectional_text_encoder_saves_loads_and_skips_layers(tmp_path, word_path):
    """`model.text_encoder.bidirectional` builds a BidirectionalCLIPTextModel (a CLIPTextModelWithWordEmbeddings
    beside the word path), which the pipeline saves under its public name, reloads bidirectional and `clip_skip`s."""
    from latentdiff import BidirectionalCLIPTextModel, CLIPTextModelWithWordEmbeddings
    from latentdiff.testing import tiny_components

    overrides = {"model.text_encoder.bidirectional": True, "model.text_encoder.word_embeddings_in_context": word_path}
    components = tiny_components(seed=0, overrides=overrides)
    cls = CLIPTextModelWithWordEmbeddings if word_path else BidirectionalCLIPTextModel
    assert type(components["text_encoder"]) is cls and components["text_encoder"].bidirectional
    pipe = make_pipe(components)
    expected = run(pipe)
    assert run(pipe, clip_skip=1).shape == expected.shape
    pipe.save_pretrained(tmp_path, model_card=False)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == ["latentdiff", cls.__name__]
    reloaded = LatentPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.text_encoder) is cls and reloaded.text_encoder.bidirectional
    np.testing.assert_allclose(run(reloaded), expected, atol=1e-6)


def test_word_embeddings_text_encoder_rejects_an_unknown_axis():
    from transformers import CLIPTextConfig

    from latentdiff import CLIPTextModelWithWordEmbeddings

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, word_embeddings_axis="rows")
    with pytest.raises(ValueError, match="word_embeddings_axis is 'rows'; expected one of \\['features', 'tokens'\\]"):
        CLIPTextModelWithWordEmbeddings(config)


def test_pixel_space_pipeline(tmp_path):
    pipe = make_pipe(pixel_components())
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    images = run(pipe, height=16, width=24)
    assert images.shape == (2, 16, 24, 3)
    assert run(pipe, output_type="latent", height=16, width=16).shape == (2, 3, 16, 16)

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    assert "pixel-diffusion" in read_front_matter(tmp_path / "README.md")["tags"]
    reloaded = LatentPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.vae is None
    np.testing.assert_allclose(run(reloaded, height=16, width=24), images, atol=1e-6)


@pytest.mark.parametrize("sampler", ["dpm", "ddim", "ddpm"])
def test_pixel_space_samplers_clip_the_predicted_image(tmp_path, sampler):
    """A pixel-space model as the trainer exports it (`make_pipeline`, DDPM's linear schedule) clips every predicted
    x0 to [-1, 1], after saving and reloading and with any clipping sampler built from the saved config.

    The denoiser predicts no noise at all (as an untrained one nearly does), so x0 = x_t / sqrt(abar_t): without
    clipping, the image the sampler ends on is the initial noise times 1 / sqrt(abar_T) ~ 150, as the first
    MNIST model's saturated samples were; with it, every step moves towards an image in [-1, 1]."""
    from latentdiff.config import load_config
    from latentdiff.diffusion import make_noise_scheduler
    from latentdiff.sampling import make_pipeline

    diffusion = load_config(overrides={"diffusion.beta_schedule": "linear", "diffusion.beta_start": 0.0001,
                                       "diffusion.beta_end": 0.02}).diffusion
    parts = pixel_components()
    make_pipeline(None, parts["text_encoder"], parts["tokenizer"], parts["unet"], make_noise_scheduler(diffusion)).save_pretrained(tmp_path)
    pipe = LatentPipeline.from_pretrained(tmp_path)
    pipe.scheduler = scheduler_from_name(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.forward = lambda sample, *args, **kwargs: (torch.zeros_like(sample),)
    final = run(pipe, output_type="latent", num_inference_steps=10, height=8, width=8, guidance_scale=1.0)
    assert final.shape == (2, 3, 8, 8)
    assert final.abs().max() < 2.0, f"{sampler}: the sampler ended on values up to {final.abs().max():.0f}, not an image in [-1, 1]"


# --------------------------------------------------------------------------------------------
# Seed interpolation
# --------------------------------------------------------------------------------------------


def test_slerp_endpoints_and_norm():
    from latentdiff.pipelines.pipeline_latent import slerp

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 4, 16, 16, generator=generator)
    torch.testing.assert_close(slerp(0.0, a, b), a, rtol=0, atol=0)
    torch.testing.assert_close(slerp(1.0, a, b), b, rtol=0, atol=0)
    # Two Gaussian draws are nearly orthogonal: the midpoint of a linear blend shrinks by ~1/sqrt(2),
    # slerp keeps the norm.
    middle = slerp(0.5, a, b)
    assert abs(middle.norm() / a.norm() - 1) < 0.05
    assert ((a + b) / 2).norm() / a.norm() < 0.8


def test_interpolate_ends_match_plain_ddim_calls(components):
    pipe = make_pipe(components, "dpm")
    frames = pipe.interpolate("a red circle", seed_a=3, seed_b=4, num_frames=4, num_inference_steps=2,
                              batch_size=3, output_type="np")
    assert frames.shape == (4, 32, 32, 3)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)  # restored after the call

    ddim = make_pipe(components, "ddim")
    np.testing.assert_allclose(frames[0], run(ddim, "a red circle", seed=3)[0], atol=1e-5)
    np.testing.assert_allclose(frames[-1], run(ddim, "a red circle", seed=4)[0], atol=1e-5)
    steps = [np.abs(frames[i + 1] - frames[i]).mean() for i in range(3)]
    assert min(steps) > 0  # every frame differs from the next

    pil_frames = pipe.interpolate("a red circle", 3, 4, num_frames=2, num_inference_steps=2)
    assert len(pil_frames) == 2 and pil_frames[0].size == (32, 32)
    with pytest.raises(ValueError, match="`num_frames`"):
        pipe.interpolate("a red circle", 3, 4, num_frames=1)


# --------------------------------------------------------------------------------------------
# Schedulers by name
# --------------------------------------------------------------------------------------------


def test_scheduler_from_name(components):
    from latentdiff.cli import SCHEDULER_CHOICES

    assert set(SCHEDULER_CHOICES) == set(SCHEDULER_NAMES)
    config = components["scheduler"].config
    for name in SCHEDULER_NAMES:
        scheduler = scheduler_from_name(name, config)
        assert isinstance(scheduler, scheduler_class(name))
        assert scheduler.config.beta_schedule == "scaled_linear"  # the schedule carries over
    assert scheduler_from_name("dpm", config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="unknown scheduler 'heun'; expected one of: ddim, dpm, euler"):
        scheduler_from_name("heun", config)


# --------------------------------------------------------------------------------------------
# `latentdiff generate`
# --------------------------------------------------------------------------------------------


def test_generate_command_writes_images_and_grid(components, tmp_path, capsys):
    from PIL import Image

    from latentdiff.cli import main

    model = tmp_path / "model"
    pipe = make_pipe(components)
    pipe.sampling_defaults = {"guidance_scale": 3.0}
    pipe.save_pretrained(model, model_card=False)
    out = tmp_path / "out"
    argv = ["generate", str(model), "a red circle", "two blue squares", "-n", "2", "--steps", "2",
            "--scheduler", "ddim", "--seed", "5", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(os.listdir(out))
    assert names == ["000-a-red-circle.png", "001-a-red-circle.png", "002-two-blue-squares.png",
                     "003-two-blue-squares.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 64)  # 2 prompts (rows) x 2 images (columns) of 32 px
    assert "guidance 3.0" in capsys.readouterr().out  # the model's own default

    # Image 2 is the first image of prompt 2 drawn with seed 5 + 2.
    expected = run(pipe, "two blue squares", seed=7, guidance_scale=3.0, output_type="pil")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "002-two-blue-squares.png")), np.asarray(expected))

    # --guidance-rescale reaches the pipeline (Lin et al. 2024's rescale of the guided prediction)
    assert main(argv[:4] + ["-n", "1", "--steps", "2", "--scheduler", "ddim", "--seed", "5", "--guidance-rescale", "0.7",
                            "--out", str(tmp_path / "rescaled")]) == 0
    expected = run(pipe, "a red circle", seed=5, guidance_scale=3.0, guidance_rescale=0.7, output_type="pil")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rescaled" / "000-a-red-circle.png")), np.asarray(expected))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--size", "33x32"], "`height` and `width` have to be divisible by 2"),
        (["--guidance-rescale", "2"], "`guidance_rescale` has to be a number in [0, 1] but is 2.0."),
    ],
)
def test_generate_command_bad_input(components, tmp_path, capsys, extra, message):
    from latentdiff.cli import main

    make_pipe(components).save_pretrained(tmp_path / "model", model_card=False)
    assert main(["generate", str(tmp_path / "model"), "a red circle", "--out", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_command_rejects_unknown_scheduler(capsys):
    from latentdiff.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "model", "a red circle", "--scheduler", "heun"])
    assert "invalid choice: 'heun'" in capsys.readouterr().err


def test_a_high_noise_expert_denoises_its_band_and_survives_save_and_reload(components, tmp_path):
    import copy

    expert = copy.deepcopy(components["unet"])
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.add_(0.05)
    plain = make_pipe(components)
    with_expert = make_pipe(components, unet_high_noise=expert, boundary_ratio=0.5)
    # 2 DDIM steps run at t = 501 and 1: the first is the expert's, so the images differ from the U-Net's alone
    assert not np.allclose(run(with_expert), run(plain), atol=1e-4)
    # at boundary 0.999 no step reaches the expert: the U-Net alone
    never = make_pipe(components, unet_high_noise=expert, boundary_ratio=0.999)
    np.testing.assert_allclose(run(never), run(plain), atol=1e-6)
    assert "forward" not in vars(with_expert.unet)  # the switch lasts for the call only
    # `components` carry the expert and its boundary to another pipeline, and leave them out without an expert
    np.testing.assert_allclose(run(make_pipe(with_expert.components)), run(with_expert), atol=1e-6)
    assert "unet_high_noise" not in plain.components and "boundary_ratio" not in plain.components

    expected = run(with_expert)
    with_expert.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["unet_high_noise"] == ["diffusers", "UNet2DConditionModel"] and model_index["boundary_ratio"] == 0.5
    reloaded = LatentPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(reloaded), expected, atol=1e-6)
    assert "`unet_high_noise`" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"boundary_ratio": 0.7}, "`unet_high_noise` and `boundary_ratio` go together"),
        ({"unet_high_noise": "expert"}, "`unet_high_noise` and `boundary_ratio` go together"),
        ({"unet_high_noise": "expert", "boundary_ratio": 700}, "between 0 and 1"),
    ],
)
def test_a_high_noise_expert_needs_its_boundary(components, extra, message):
    if extra.get("unet_high_noise") == "expert":
        extra = dict(extra, unet_high_noise=components["unet"])
    with pytest.raises(ValueError, match=message):
        make_pipe(components, **extra)
