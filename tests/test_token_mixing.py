"""The causal token mixing of the text encoder (`model.text_encoder.token_mixing_width`): a word reads the words before it."""

from __future__ import annotations

import pytest
import torch

from latentdiff import BidirectionalCLIPTextModel, LatentPipeline
from latentdiff.config import ConfigError, ModelConfig, TextEncoderConfig, load_config
from latentdiff.models import build_text_encoder
from latentdiff.testing import tiny_components

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=0, num_attention_heads=2, max_position_embeddings=16)


def encoders(width: int = 3, depthwise: bool = False, gated: bool = False, **text):
    """The same encoder built without and with token mixing (same seed, so the same embeddings)."""
    torch.manual_seed(0)
    plain = build_text_encoder(ModelConfig(text_encoder=TextEncoderConfig(**(TEXT | text)))).eval()
    torch.manual_seed(0)
    mixed = build_text_encoder(ModelConfig(text_encoder=TextEncoderConfig(
        token_mixing_width=width, token_mixing_depthwise=depthwise, token_mixing_gated=gated, **(TEXT | text)))).eval()
    return plain, mixed


@pytest.mark.parametrize("gated", [False, True])
@torch.no_grad()
def test_token_mixing_starts_as_the_encoder_without_it(gated):
    plain, mixed = encoders(gated=gated)
    assert isinstance(mixed, BidirectionalCLIPTextModel) and not mixed.bidirectional
    ids = torch.randint(0, 1000, (3, 16))
    torch.testing.assert_close(mixed(ids).last_hidden_state, plain(ids).last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(mixed(ids).pooler_output, plain(ids).pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("depthwise", [False, True])
def test_a_token_reads_only_itself_and_the_width_minus_one_tokens_before_it(depthwise):
    _, mixed = encoders(width=3, depthwise=depthwise)
    assert mixed.embeddings.token_mixing.conv.weight.shape == ((32, 1, 3) if depthwise else (32, 32, 3))
    torch.manual_seed(1)
    for parameter in mixed.embeddings.token_mixing.parameters():  # as after training: no longer zero
        torch.nn.init.normal_(parameter)
    ids = torch.randint(1, 1000, (1, 16))
    changed = ids.clone()
    changed[0, 5] += 1  # one word differs
    with torch.no_grad():
        difference = (mixed(ids).last_hidden_state - mixed(changed).last_hidden_state).abs().amax(dim=-1)[0]
    moved = (difference > 1e-6).nonzero().flatten().tolist()
    assert moved == [5, 6, 7]  # the word itself and the two after it, which read it; none before it


@torch.no_grad()
def test_a_gated_mixing_scales_each_tokens_mix_by_a_gate_read_from_that_token():
    _, ungated = encoders(width=2)
    _, gated = encoders(width=2, gated=True)
    torch.manual_seed(1)
    weight = torch.randn_like(gated.embeddings.token_mixing.conv.weight)
    for encoder in (ungated, gated):
        encoder.embeddings.token_mixing.conv.weight.copy_(weight)
    embeddings = torch.randn(2, 16, 32)  # a batch of token embeddings
    mixing = ungated.embeddings.token_mixing
    torch.testing.assert_close(gated.embeddings.token_mixing.gates(embeddings), torch.full((2, 16), 0.5))  # at the start
    torch.testing.assert_close(gated.embeddings.token_mixing(embeddings), 0.5 * mixing(embeddings))
    # a gate read from the token's own embedding: here, open for the tokens whose first feature is positive
    gated.embeddings.token_mixing.gate.weight[0, 0] = 100.0
    gates = gated.embeddings.token_mixing.gates(embeddings)
    torch.testing.assert_close(gates, torch.sigmoid(100.0 * embeddings[..., 0]))
    torch.testing.assert_close(gated.embeddings.token_mixing(embeddings), gates.unsqueeze(-1) * mixing(embeddings))
    assert ungated.embeddings.token_mixing.gates(embeddings) is None


def test_the_mixing_learns_from_zero():
    _, mixed = encoders()
    mixed.train()
    mixed(torch.randint(0, 1000, (4, 16))).last_hidden_state.square().sum().backward()
    assert mixed.embeddings.token_mixing.conv.weight.grad.abs().sum() > 0


def saved_and_reloaded(overrides: dict, folder):
    """A tiny pipeline whose text encoder has token mixing (its weights made nonzero), saved to ``folder`` and loaded
    back; with the token ids of a two-object caption."""
    components = tiny_components(overrides=overrides)
    torch.manual_seed(2)
    torch.nn.init.normal_(components["text_encoder"].embeddings.token_mixing.conv.weight, std=0.1)
    pipe = LatentPipeline(**components)
    pipe.save_pretrained(folder)
    ids = pipe.tokenizer(["a red square and a blue circle"], padding="max_length", return_tensors="pt").input_ids
    return pipe, LatentPipeline.from_pretrained(folder), ids


@torch.no_grad()
def test_a_pipeline_with_token_mixing_saves_and_reloads_the_same(tmp_path):
    pipe, again, ids = saved_and_reloaded({"model.text_encoder.token_mixing_width": 3}, tmp_path)
    assert type(again.text_encoder).__name__ == "BidirectionalCLIPTextModel"
    assert again.text_encoder.config.token_mixing_width == 3
    torch.testing.assert_close(again.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    first = pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    second = again("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.text_encoder.token_mixing_width=1"], "token_mixing_width.*at least 2"),
        (["model.text_encoder.token_mixing_width=-3"], "token_mixing_width.*integer >= 0"),
        (["model.text_encoder.token_mixing_width=3", "model.text_encoder.kind=open_clip"], "token_mixing_width.*CLIP encoder"),
        (["model.text_encoder.token_mixing_width=3", "model.text_encoder.pretrained=some/clip"], "token_mixing_width.*config.json"),
        (["model.text_encoder.token_mixing_depthwise=true"], "token_mixing_depthwise.*token_mixing_width is set"),
        (["model.text_encoder.token_mixing_gated=true"], "token_mixing_gated.*token_mixing_width is set"),
        (["train.token_mixing_from_step=5"], "token_mixing_from_step.*token_mixing_width is set"),
        (["train.token_mixing_from_step=5", "model.text_encoder.token_mixing_width=2", "model.text_encoder.train=false"],
         "token_mixing_from_step.*text_encoder.train is true"),
        (["train.token_mixing_from_step=8", "train.max_steps=8", "model.text_encoder.token_mixing_width=2"],
         "token_mixing_from_step.*before train.max_steps=8.*train.token_mixing_from_step=4"),
        (["train.token_mixing_from_step=-1", "model.text_encoder.token_mixing_width=2"], "token_mixing_from_step.*integer >= 0"),
    ],
)
def test_token_mixing_refuses_what_it_cannot_build(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_the_expert_stage_loads_stage_2s_encoder_whatever_built_it(tmp_path):
    """The low-noise expert stage runs with the user's overrides; the ones that build an encoder from scratch
    (token mixing, zero-initialized layers) give way to loading stage 2's encoder, instead of a config error."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "train_low_noise_expert.py"
    spec = importlib.util.spec_from_file_location("train_low_noise_expert", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    user = [f"output_dir={tmp_path}", "low_noise_expert.max_steps=10", "model.text_encoder.num_hidden_layers=1",
            "model.text_encoder.token_mixing_width=3", "model.text_encoder.token_mixing_depthwise=true",
            "model.text_encoder.zero_init_residual=true", "model.text_encoder.token_mixing_gated=true",
            "train.token_mixing_from_step=5"]
    config = load_config(None, user)
    expert = load_config(None, [*user, *module.expert_overrides(config)])
    assert expert.model.text_encoder.pretrained and not expert.model.text_encoder.token_mixing_width
    assert not expert.train.token_mixing_from_step and not expert.model.text_encoder.token_mixing_gated


@torch.no_grad()
def test_the_words_beside_the_mixed_tokens_are_the_embeddings_before_the_mixing():
    """`word_embeddings_in_context` with token mixing and no layers: [LN(words), LN(words + mixing(words))] per token."""
    _, mixed = encoders(width=2)
    torch.manual_seed(0)
    beside = build_text_encoder(ModelConfig(text_encoder=TextEncoderConfig(
        token_mixing_width=2, word_embeddings_in_context=True, **TEXT))).eval()
    beside.load_state_dict(mixed.state_dict())
    for parameter in beside.embeddings.token_mixing.parameters():
        torch.nn.init.normal_(parameter)
    mixed.load_state_dict(beside.state_dict())
    ids = torch.randint(1, 1000, (2, 16))
    context = beside(ids).last_hidden_state
    assert context.shape == (2, 16, 64)
    words = beside.final_layer_norm(beside.embeddings.token_embedding(ids) + beside.embeddings.position_embedding.weight[:16])
    torch.testing.assert_close(context[..., :32], words)
    torch.testing.assert_close(context[..., 32:], mixed(ids).last_hidden_state)
    hidden_states = beside(ids, output_hidden_states=True).hidden_states
    with pytest.raises(ValueError, match="token mixing needs the input_ids"):
        beside.conditioning(hidden_states)
    torch.testing.assert_close(beside.conditioning(hidden_states, input_ids=ids), context)


@torch.no_grad()
def test_a_pipeline_with_the_words_beside_the_mixed_tokens_saves_and_reloads_the_same(tmp_path):
    pipe, again, ids = saved_and_reloaded({"model.text_encoder.token_mixing_width": 2, "model.text_encoder.num_hidden_layers": 0,
                                           "model.text_encoder.word_embeddings_in_context": True}, tmp_path)
    assert type(again.text_encoder).__name__ == "CLIPTextModelWithWordEmbeddings"
    torch.testing.assert_close(again.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    assert pipe.text_encoder(ids)[0].shape[-1] == 2 * pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    image = again("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape[-3] == 3 and torch.isfinite(image).all()


@torch.no_grad()
def test_a_saved_encoder_with_token_mixing_loads_with_its_mixing(tmp_path):
    """As the low-noise expert stage loads stage 2's encoder: `model.text_encoder.pretrained=FOLDER`, no mixing option."""
    _, mixed = encoders(width=2, depthwise=True, gated=True)
    torch.nn.init.normal_(mixed.embeddings.token_mixing.conv.weight, std=0.1)
    torch.nn.init.normal_(mixed.embeddings.token_mixing.gate.weight, std=0.1)
    mixed.save_pretrained(tmp_path)
    loaded = build_text_encoder(load_config(None, [f"model.text_encoder.pretrained={tmp_path}"]).model).eval()
    assert isinstance(loaded, BidirectionalCLIPTextModel) and loaded.embeddings.token_mixing.gate is not None
    ids = torch.randint(1, 1000, (2, 16))
    torch.testing.assert_close(loaded(ids).last_hidden_state, mixed(ids).last_hidden_state)


@torch.no_grad()
def test_the_probe_sees_no_mixing_at_the_start_and_reads_what_a_noun_and_a_place_word_take_in(tmp_path):
    from latentdiff.testing import load_bench_script

    script = load_bench_script("token_mixing_probe")
    components = tiny_components(overrides={"model.text_encoder.token_mixing_width": 2, "model.text_encoder.num_hidden_layers": 0})
    LatentPipeline(**components).save_pretrained(tmp_path)
    tokenizer, encoder = script.load(str(tmp_path))
    captions = ["a small red square at the top left", "two blue circles"]
    assert set(script.mixing_by_kind(tokenizer, encoder, captions).values()) == {0.0}  # zero-initialized
    assert script.color_in_the_noun(tokenizer, encoder)[0] == 0.0
    torch.manual_seed(0)
    torch.nn.init.normal_(encoder.embeddings.token_mixing.conv.weight, std=0.1)
    by_kind = script.mixing_by_kind(tokenizer, encoder, captions)
    assert {"color", "shape", "place", "count"} <= set(by_kind) and min(by_kind.values()) > 0
    assert script.color_in_the_noun(tokenizer, encoder)[0] > 0  # the noun now reads its color ...
    assert script.shape_in_the_place_word(tokenizer, encoder)[0] == 0.0  # ... and at width 2 "top" reads only "the"
    assert script.row_in_the_column_word(tokenizer, encoder)[0] > 0  # but "left" reads "top" or "bottom"
    assert script.gates_by_kind(tokenizer, encoder, captions) is None  # ungated


@torch.no_grad()
def test_the_probe_reads_the_gates_by_kind_of_word(tmp_path):
    from latentdiff.testing import load_bench_script

    script = load_bench_script("token_mixing_probe")
    components = tiny_components(overrides={"model.text_encoder.token_mixing_width": 2, "model.text_encoder.token_mixing_gated": True,
                                            "model.text_encoder.num_hidden_layers": 0})
    LatentPipeline(**components).save_pretrained(tmp_path)
    tokenizer, encoder = script.load(str(tmp_path))
    captions = ["a small red square at the top left", "two blue circles"]
    assert script.gates_by_kind(tokenizer, encoder, captions) == {kind: 0.5 for kind in ("color", "count", "other", "place", "shape")}
    encoder.embeddings.token_mixing.gate.bias.fill_(-2.0)
    closed = torch.sigmoid(torch.tensor(-2.0)).item()
    assert all(value == pytest.approx(closed) for value in script.gates_by_kind(tokenizer, encoder, captions).values())
