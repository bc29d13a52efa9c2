"""The web demo driven as a visitor's browser would, through ``gradio_client`` on 127.0.0.1: every tab
returns images of the expected size, and bad input comes back as the pipeline's own message.
Tiny random components, 2 steps."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from latentdiff.demo import build_demo, editor_image_and_mask, launch_demo, load_demo_pipelines  # noqa: E402

STEPS = 2
SIZE = 32  # the tiny model's image size


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved tiny pipeline with its own sampling defaults (latentdiff.json)."""
    from latentdiff import LatentPipeline
    from latentdiff.testing import tiny_components

    pipeline = LatentPipeline(**tiny_components(seed=0))
    pipeline.sampling_defaults = {"guidance_scale": 3.0, "num_inference_steps": STEPS, "example_prompt": "a red circle"}
    folder = tmp_path_factory.mktemp("model")
    pipeline.save_pretrained(folder, model_card=False)
    return folder


@pytest.fixture(scope="module")
def pipelines(model_folder):
    return load_demo_pipelines(str(model_folder), device="cpu")


@pytest.fixture(scope="module")
def client(model_folder, tmp_path_factory):
    """The demo as `latentdiff demo MODEL` serves it, on 127.0.0.1, and a client connected to it."""
    port = _free_port()
    demo = launch_demo(str(model_folder), host="127.0.0.1", port=port, device="cpu", block=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        demo.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "image.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def _mask_file(folder, height: int, width: int, box=(4, 20, 8, 24)):
    mask = np.zeros((height, width), dtype=np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 255
    path = folder / f"mask-{height}x{width}.png"
    Image.fromarray(mask).save(path)
    return path, mask


def _images(gallery) -> list[np.ndarray]:
    return [np.asarray(Image.open(item["image"]["path"] if isinstance(item["image"], dict) else item["image"]))
            for item in gallery]


# Sampling controls in the order of the page: images, steps, guidance, sampler, seed, random seed.
def _controls(num_images=2, steps=STEPS, seed=7, randomize=False, sampler="ddim", guidance=3.0):
    return [num_images, steps, guidance, sampler, seed, randomize]


def test_text_to_image_tab(client, pipelines):
    gallery, seed = client.predict("a red circle", "", *_controls(num_images=3), api_name="/text_to_image")
    images = _images(gallery)
    assert [image.shape for image in images] == [(SIZE, SIZE, 3)] * 3
    assert seed == 7 and [item["caption"] for item in gallery] == ["seed 7", "seed 8", "seed 9"]
    # The same image as the pipeline gives for that seed (the page adds nothing of its own).
    import torch

    from latentdiff.models.schedulers import scheduler_from_name

    pipe = pipelines.text_to_image
    pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
    expected = pipe("a red circle", num_inference_steps=STEPS, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(8), output_type="np").images[0]
    np.testing.assert_allclose(images[1] / 255.0, expected, atol=1 / 255 + 1e-6)


def test_random_seed_is_drawn_and_shown(client):
    gallery, seed = client.predict("a red circle", "", *_controls(num_images=1, seed=0, randomize=True),
                                   api_name="/text_to_image")
    assert isinstance(seed, (int, float)) and gallery[0]["caption"] == f"seed {int(seed)}"


def test_image_to_image_tab(client, image_file):
    gallery, _ = client.predict(handle_file(str(image_file)), "a blue square", "", 0.5, *_controls(),
                                api_name="/image_to_image")
    assert [image.shape for image in _images(gallery)] == [(SIZE, SIZE, 3)] * 2


def test_inpainting_tab_with_an_uploaded_mask(client, image_file, tmp_path):
    mask_path, mask = _mask_file(tmp_path, SIZE, SIZE)
    editor = {"background": handle_file(str(image_file)), "layers": [], "composite": None}
    gallery, _ = client.predict(editor, handle_file(str(mask_path)), "a blue square", "", 1, 1, *_controls(),
                                api_name="/inpaint")
    original = np.asarray(Image.open(image_file))
    for image in _images(gallery):
        assert image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(image[mask == 0], original[mask == 0])  # kept exactly outside the mask


def test_inpainting_tab_with_a_mask_painted_in_the_page(client, image_file, tmp_path):
    # What the editor sends: the image, and a transparent layer with the painted strokes.
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[10:20, 5:15] = (255, 255, 255, 255)
    layer_path = tmp_path / "layer.png"
    Image.fromarray(layer, mode="RGBA").save(layer_path)
    editor = {"background": handle_file(str(image_file)), "layers": [handle_file(str(layer_path))], "composite": None}
    gallery, _ = client.predict(editor, None, "a blue square", "", 1, 1, *_controls(num_images=1),
                                api_name="/inpaint")
    (image,) = _images(gallery)
    original = np.asarray(Image.open(image_file))
    painted = layer[..., 3] > 0
    np.testing.assert_array_equal(image[~painted], original[~painted])
    assert not np.array_equal(image[painted], original[painted])


def test_outpainting_tab(client, image_file):
    gallery, _ = client.predict(handle_file(str(image_file)), "a blue square", "", 8, 8, 0, 4, 1, 1, *_controls(),
                                api_name="/outpaint")
    images = _images(gallery)
    assert [image.shape for image in images] == [(SIZE + 4, SIZE + 16, 3)] * 2
    np.testing.assert_array_equal(images[0][:SIZE, 8 : 8 + SIZE], np.asarray(Image.open(image_file)))


def test_bad_input_comes_back_as_the_pipelines_message(client, image_file, tmp_path):
    with pytest.raises(AppError, match="Provide either `prompt` or `prompt_embeds`"):
        client.predict("  ", "", *_controls(), api_name="/text_to_image")
    with pytest.raises(AppError, match="`num_inference_steps` has to be a positive integer but is 0"):
        client.predict("a red circle", "", *_controls(steps=0), api_name="/text_to_image")
    mask_path, _ = _mask_file(tmp_path, SIZE // 2, SIZE)
    editor = {"background": handle_file(str(image_file)), "layers": [], "composite": None}
    with pytest.raises(AppError, match=r"`mask_image` is 16x32 \(HxW\) but `image` is 32x32"):
        client.predict(editor, handle_file(str(mask_path)), "a blue square", "", 1, 1, *_controls(),
                       api_name="/inpaint")
    with pytest.raises(AppError, match="`left`=3 is not a multiple of 2"):
        client.predict(handle_file(str(image_file)), "x", "", 3, 0, 0, 0, 1, 1, *_controls(), api_name="/outpaint")
    # The demo still serves after the errors.
    gallery, _ = client.predict("a red circle", "", *_controls(num_images=1), api_name="/text_to_image")
    assert len(gallery) == 1


def test_the_page_takes_its_defaults_from_the_model(pipelines):
    demo = build_demo(pipelines)
    values = {getattr(block, "label", None): getattr(block, "value", None) for block in demo.blocks.values()}
    assert values["Guidance scale"] == 3.0 and values["Steps"] == STEPS and values["Prompt"] == "a red circle"


def test_without_saved_defaults_the_page_starts_where_a_call_would():
    """No latentdiff.json: Diffusers' defaults, as a pipeline call without steps or guidance, and the
    sampler the model folder holds."""
    import inspect

    from diffusers import StableDiffusionPipeline

    from latentdiff import LatentPipeline
    from latentdiff.demo import DemoPipelines
    from latentdiff.testing import tiny_components

    pipelines = DemoPipelines.from_pipeline(LatentPipeline(**tiny_components(seed=0)))
    diffusers_defaults = inspect.signature(StableDiffusionPipeline.__call__).parameters
    assert pipelines.guidance_scale == diffusers_defaults["guidance_scale"].default == 7.5
    assert pipelines.num_inference_steps == diffusers_defaults["num_inference_steps"].default == 50
    assert pipelines.sampler == "ddim"  # tiny_components' DDIMScheduler


def test_editor_mask_is_the_painted_pixels():
    image = Image.new("RGB", (8, 6), "red")
    layer = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    layer.putpixel((2, 3), (255, 255, 255, 128))
    _, mask = editor_image_and_mask({"background": image, "layers": [layer], "composite": None})
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected[3, 2] = 255
    np.testing.assert_array_equal(np.asarray(mask), expected)
