"""OpenCLIPTextModel: numerics against OpenCLIP itself, Diffusers save / load, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from latentdiff.models.text_encoders import OpenCLIPTextModel, open_clip_text_config

# A tiny OpenCLIP architecture in OpenCLIP's own config format (read through "local-dir:").
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}
CAPTIONS = ["a red circle at the top left", "two green triangles!!", "", "a photo of a cat " * 30]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny OpenCLIP CLIP model, its ``local-dir:`` name and its safetensors checkpoint."""
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()
    with torch.no_grad():  # move LayerNorm gains / biases off 1 and 0 so every tensor matters
        for parameter in clip.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("tiny_open_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG}))
    checkpoint = folder / "open_clip_model.safetensors"
    save_file({key: value.contiguous() for key, value in clip.state_dict().items()}, str(checkpoint))
    return clip, f"local-dir:{folder}", str(checkpoint)


def _sd2_penultimate(clip, input_ids: torch.Tensor) -> torch.Tensor:
    """Stable Diffusion 2's FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer.

    Written with OpenCLIP's modules, as in stablediffusion/ldm/modules/encoders/modules.py; the
    permutes to sequence-first are left out because OpenCLIP's blocks are batch-first now.
    """
    x = clip.token_embedding(input_ids) + clip.positional_embedding
    blocks = clip.transformer.resblocks
    for index, block in enumerate(blocks):
        if index == len(blocks) - 1:  # layer_idx = 1: stop before the last block
            break
        x = block(x, attn_mask=clip.attn_mask)
    return clip.ln_final(x)


def test_matches_open_clip(tiny_clip):
    clip, name, checkpoint = tiny_clip
    penultimate = OpenCLIPTextModel.from_open_clip(name, checkpoint).eval()
    last = OpenCLIPTextModel.from_open_clip(name, checkpoint, hidden_layer="last").eval()
    assert penultimate.config.hidden_act == "quick_gelu" and penultimate.config.output_dim == 16
    input_ids = open_clip.tokenize(CAPTIONS)

    with torch.no_grad():
        output = penultimate(input_ids, output_hidden_states=True)
        output_last = last(input_ids)
        expected_pooled = clip.encode_text(input_ids)
        expected_penultimate = _sd2_penultimate(clip, input_ids)
        x = clip.token_embedding(input_ids) + clip.positional_embedding
        expected_last = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))

    torch.testing.assert_close(output.last_hidden_state, expected_penultimate, rtol=0, atol=1e-5)
    torch.testing.assert_close(output[0], expected_penultimate, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.pooler_output, expected_pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(output_last.last_hidden_state, expected_last, rtol=0, atol=1e-5)
    torch.testing.assert_close(output_last.pooler_output, expected_pooled, rtol=0, atol=1e-5)
    # The two layers really differ, so the comparisons above tell them apart.
    assert (expected_penultimate - expected_last).abs().max() > 1e-2
    # hidden_states: the embeddings, then one entry per block, without the final layer norm.
    assert len(output.hidden_states) == 1 + 3
    torch.testing.assert_close(penultimate.text_model.ln_final(output.hidden_states[-2]), expected_penultimate)


def test_tuple_output_and_shorter_input(tiny_clip):
    _, name, checkpoint = tiny_clip
    model = OpenCLIPTextModel.from_open_clip(name, checkpoint).eval()
    input_ids = open_clip.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        full = model(input_ids)
        as_tuple = model(input_ids, return_dict=False)
        short = model(input_ids[:, :12])  # causal: the first 12 tokens do not see the rest
    assert len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], full.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], full.pooler_output)
    # The two forward passes reduce over 12 and 77 positions, so matmul blocking and softmax sums
    # differ and the results agree only up to float32 rounding, which depends on the torch build
    # (seen: 0 on torch 2.15.0, 1.2e-6 on 2.14.1). torch.testing's float32 tolerances (rtol 1.3e-6,
    # atol 1e-5) bound that rounding; a token that saw the rest of the sequence would differ by far
    # more, as the check below shows.
    torch.testing.assert_close(short.last_hidden_state, full.last_hidden_state[:, :12])
    # Other tokens after position 12 change every later position, and none before it.
    altered_ids = input_ids.clone()
    altered_ids[:, 12:] = input_ids[:, 1:2]
    with torch.no_grad():
        altered = model(altered_ids).last_hidden_state
    torch.testing.assert_close(altered[:, :12], full.last_hidden_state[:, :12])
    assert (altered[:, 12:] - full.last_hidden_state[:, 12:]).abs().amax(dim=-1).min() > 1e-2


def test_padding_attention_mask(tiny_clip):
    _, name, checkpoint = tiny_clip
    model = OpenCLIPTextModel.from_open_clip(name, checkpoint).eval()
    input_ids = open_clip.tokenize(["a red circle", "two small blue squares below a triangle"])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        plain = model(input_ids)
        all_ones = model(input_ids, attention_mask=torch.ones_like(input_ids))
        masked = model(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(all_ones.last_hidden_state, plain.last_hidden_state)
    # Under the causal mask real tokens never see the padding, so only padded positions change.
    real = attention_mask.bool()
    torch.testing.assert_close(masked.last_hidden_state[real], plain.last_hidden_state[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked.pooler_output, plain.pooler_output, rtol=0, atol=1e-5)
    assert (masked.last_hidden_state[~real] - plain.last_hidden_state[~real]).abs().max() > 1e-3
    assert torch.isfinite(masked.last_hidden_state).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = OpenCLIPTextModel(width=32, layers=2, heads=4, mlp_ratio=2.0)
    input_ids = open_clip.tokenize(["a red circle", "a blue square"])

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        model(input_ids).last_hidden_state.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference = gradients()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = gradients()
    assert len(reference) == len(checkpointed) > 0
    for expected, actual in zip(reference, checkpointed):
        torch.testing.assert_close(actual, expected)


def test_config_of_open_clip_architectures():
    vit_h = open_clip_text_config("ViT-H-14")
    assert vit_h == {
        "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4.0, "context_length": 77,
        "vocab_size": 49408, "hidden_act": "gelu", "output_dim": 1024,
    }
    assert open_clip_text_config("ViT-B-32-quickgelu")["hidden_act"] == "quick_gelu"
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        open_clip_text_config("ViT-Z-99")
    with pytest.raises(ValueError, match="Hub"):
        open_clip_text_config("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with pytest.raises(ValueError, match="embed_cls"):
        open_clip_text_config("coca_ViT-B-32")
    with pytest.raises(ValueError, match="hf_model_name"):
        open_clip_text_config("roberta-ViT-B-32")


def test_from_open_clip_checkpoint_errors(tiny_clip, tmp_path):
    clip, name, checkpoint = tiny_clip
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OpenCLIPTextModel.from_open_clip(name, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        OpenCLIPTextModel.from_open_clip("ViT-Z-99", checkpoint)
    # The tiny checkpoint is not a ViT-B-32 text tower (3 blocks, not 12), nor a wider tiny one.
    with pytest.raises(ValueError, match="does not match the text tower of OpenCLIP 'ViT-B-32'"):
        OpenCLIPTextModel.from_open_clip("ViT-B-32", checkpoint)
    wider = {**TINY_OPEN_CLIP_CONFIG, "text_cfg": {**TINY_OPEN_CLIP_CONFIG["text_cfg"], "width": 64}}
    (tmp_path / "wider").mkdir()
    (tmp_path / "wider" / "open_clip_config.json").write_text(json.dumps({"model_cfg": wider}))
    with pytest.raises(ValueError, match=r"has shape \(.*32.*\), the architecture expects \(.*64.*\)"):
        OpenCLIPTextModel.from_open_clip(f"local-dir:{tmp_path / 'wider'}", checkpoint)

    pickled = tmp_path / "open_clip_model.pt"
    state = {f"module.{key}": value for key, value in clip.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, pickled)  # an OpenCLIP training checkpoint
    with pytest.raises(ValueError, match="allow_pickle=True"):
        OpenCLIPTextModel.from_open_clip(name, pickled)
    from_pickle = OpenCLIPTextModel.from_open_clip(name, pickled, allow_pickle=True)
    input_ids = open_clip.tokenize(CAPTIONS[:1])
    with torch.no_grad():
        torch.testing.assert_close(from_pickle(input_ids).pooler_output, clip.encode_text(input_ids))

    image_only = tmp_path / "image_only.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items() if k.startswith("visual.")}, str(image_only))
    with pytest.raises(ValueError, match="no OpenCLIP text tower"):
        OpenCLIPTextModel.from_open_clip(name, image_only)
    two_blocks = tmp_path / "two_blocks.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items() if "resblocks.2." not in k}, str(two_blocks))
    with pytest.raises(ValueError, match="missing"):
        OpenCLIPTextModel.from_open_clip(name, two_blocks)
    other_format = tmp_path / "weights.npz"
    other_format.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        OpenCLIPTextModel.from_open_clip(name, other_format)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_layer": "middle"}, "hidden_layer must be one of"),
        ({"hidden_act": "relu"}, "hidden_act must be one of"),
        ({"width": 30, "heads": 4}, "divisible by heads"),
        ({"layers": 1}, "at least 2 layers"),
        ({"output_dim": 0}, "output_dim"),
    ],
)
def test_bad_architecture(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OpenCLIPTextModel(**{"width": 32, "layers": 2, "heads": 4, **kwargs})


def test_bad_inputs():
    model = OpenCLIPTextModel(width=32, layers=2, heads=4, context_length=8, vocab_size=100)
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="1 to 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[0, 5, 100]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def _sd_pipeline(components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _public_config(model) -> dict:
    """The architecture fields of a model's config, without Diffusers' bookkeeping (``_name_or_path``...)."""
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def _run(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt"
    ).images


def test_stable_diffusion_pipeline_save_load(tmp_path):
    from diffusers import StableDiffusionPipeline

    from latentdiff.testing import tiny_components

    components = tiny_components(seed=0, text_encoder_kind="open_clip")
    text_encoder = components["text_encoder"]
    assert isinstance(text_encoder, OpenCLIPTextModel)
    assert text_encoder.hidden_size == 32 == components["unet"].config.cross_attention_dim
    assert (text_encoder.config.layers, text_encoder.config.heads) == (2, 4)

    pipe = _sd_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    expected = _run(pipe)
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["text_encoder"][1] == "OpenCLIPTextModel"
    assert os.path.isfile(tmp_path / "text_encoder" / "diffusion_pytorch_model.safetensors")

    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.text_encoder, OpenCLIPTextModel)
    assert _public_config(reloaded.text_encoder) == _public_config(text_encoder)
    actual = _run(reloaded)
    assert actual.shape == (1, 3, 32, 32)
    assert (actual - expected).abs().max() <= 1e-5


def test_pipeline_folder_loads_after_import_latentdiff(tmp_path):
    """A fresh process that only runs ``import latentdiff`` loads the folder in stock Diffusers."""
    from latentdiff.testing import tiny_components

    components = tiny_components(seed=0, text_encoder_kind="open_clip")
    _sd_pipeline(components).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import latentdiff
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path)!r}, safety_checker=None)
        print(type(pipe.text_encoder).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OpenCLIPTextModel"
