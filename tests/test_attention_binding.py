"""Attention binding guidance (`pipelines/attention_binding.py`): the prompt's objects found among its tokens, the
cross-attention maps recorded where the U-Net computes them, the loss's three terms, and the callback moving the
latents only where it is asked to. Tiny random components."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from latentdiff import LatentPipeline
from latentdiff.pipelines.attention_binding import (
    AttentionBindingCallback,
    binding_loss,
    cross_attention_maps,
    object_token_groups,
)
from latentdiff.testing import tiny_components

PROMPT = "a red square and a green circle"
NOUNS, MODIFIERS = ["square", "circle"], ["red", "green", "small"]


def test_each_noun_takes_the_run_of_modifiers_right_before_it():
    # a=1 small=2 red=3 square=4 and=5 green=7 circle=8 the=9 (breaks a run) 10, circle+s=8,11
    ids = [0, 1, 2, 3, 4, 5, 1, 7, 8, 9, 3, 10, 4, 3, 8, 11]
    groups = object_token_groups(ids, nouns=[(4,), (8,), (8, 11)], modifiers=[(2,), (3,), (7,)])
    assert groups == [([2, 3], [4]), ([7], [8]), ([], [12]), ([13], [14, 15])]  # a word of two tokens: both


def test_the_recorded_map_is_the_attention_the_layer_applies():
    """probabilities @ values, through the output projection, is the layer's own output."""
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.attn2 = Attention(query_dim=8, cross_attention_dim=6, heads=1, dim_head=8)
    hidden, context = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    with cross_attention_maps([block]) as maps:
        output = block.attn2(hidden, encoder_hidden_states=context)
    assert len(maps) == 1 and maps[0].shape == (2, 16, 5)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 16))
    rebuilt = block.attn2.to_out[0](maps[0] @ block.attn2.to_v(context))
    torch.testing.assert_close(rebuilt, output)
    block.attn2(hidden, encoder_hidden_states=context)
    assert len(maps) == 1  # the hooks are gone after the context



class _ScaledProcessor(AttnProcessor2_0):
    """A processor of a user's own (here the stock one, doubled): the context must keep it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return 2 * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def test_recording_keeps_the_layers_output_and_gives_back_each_processor():
    """A stock processor runs a recording one inside the context (the same output, the same maps as a pre-hook's
    recomputation); any other processor is kept and its maps are recomputed; both come back on exit."""
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.attn2 = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    block.custom = torch.nn.Module()
    block.custom.attn2 = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    block.custom.attn2.load_state_dict(block.attn2.state_dict())
    block.self = torch.nn.Module()
    block.self.attn2 = Attention(query_dim=8, heads=2, dim_head=4)
    stock, custom = block.attn2.processor, _ScaledProcessor()
    block.custom.attn2.set_processor(custom)
    hidden, context = torch.randn(2, 16, 8, requires_grad=True), torch.randn(2, 5, 6)
    outside = block.attn2(hidden, encoder_hidden_states=context)
    with cross_attention_maps([block]) as maps:
        assert type(block.attn2.processor) is not type(stock) and block.custom.attn2.processor is custom
        inside = block.attn2(hidden, encoder_hidden_states=context)
        doubled = block.custom.attn2(hidden, encoder_hidden_states=context)
        block.self.attn2(hidden)  # a call without a context (self-attention) records nothing
    torch.testing.assert_close(inside, outside)
    torch.testing.assert_close(doubled, 2 * outside)
    assert len(maps) == 2 and maps[0].shape == (2, 16, 5)
    torch.testing.assert_close(maps[0], maps[1])
    with cross_attention_maps([block], recompute=True) as recomputed:
        assert block.attn2.processor is stock
        torch.testing.assert_close(block.attn2(hidden, encoder_hidden_states=context), outside)
    torch.testing.assert_close(recomputed[0], maps[0])
    assert maps[0].requires_grad  # the token loss's gradient reaches the layer's input
    assert block.attn2.processor is stock and block.custom.attn2.processor is custom
    assert "get_attention_scores" not in vars(block.attn2)

def _maps(noun_a, noun_b, modifier, pixels=4, tokens=6):
    """One image's maps (1, tokens, pixels): token 1 = modifier, 2 = noun a, 3 = noun b; the rest spread evenly."""
    maps = torch.full((1, tokens, pixels), 0.3)
    maps[0, 1], maps[0, 2], maps[0, 3] = torch.tensor(modifier), torch.tensor(noun_a), torch.tensor(noun_b)
    return maps


GROUPS = [[([1], [2]), ([], [3])]]


def test_two_nouns_on_the_same_pixels_cost_more_than_on_their_own():
    apart = binding_loss(_maps([1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]), GROUPS, [5], 1.0, 0.0)
    together = binding_loss(_maps([1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]), GROUPS, [5], 1.0, 0.0)
    assert together.item() > apart.item() + 0.5


def test_a_modifier_away_from_its_noun_costs_more():
    with_noun = binding_loss(_maps([1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]), GROUPS, [5], 0.0, 1.0)
    elsewhere = binding_loss(_maps([1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]), GROUPS, [5], 0.0, 1.0)
    assert elsewhere.item() > with_noun.item() + 0.5


def test_a_neglected_noun_sets_the_attend_and_excite_term():
    strong = binding_loss(_maps([1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]), GROUPS, [5], 0.0, 0.0)
    neglected = binding_loss(_maps([1, 1, 0, 0], [0.02] * 4, [1, 1, 0, 0]), GROUPS, [5], 0.0, 0.0)
    assert neglected.item() > strong.item() + 0.5
    assert binding_loss(_maps([1] * 4, [1] * 4, [1] * 4), [[]], [5]).item() == 0  # no object named: no loss


@pytest.fixture(scope="module")
def pipe():
    parts = tiny_components(seed=0)
    return LatentPipeline(**parts)


def _images(pipe, prompt=PROMPT, callback=None, **kwargs):
    generator = torch.Generator("cpu").manual_seed(0)
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    out = pipe(prompt, num_inference_steps=4, guidance_scale=2.0, generator=generator, output_type="np", **kwargs)
    return out.images


def test_the_callback_moves_the_latents_at_the_high_noise_steps_only(pipe):
    plain = _images(pipe)
    everywhere = AttentionBindingCallback(nouns=NOUNS, modifiers=MODIFIERS, step_size=0.5, min_timestep=0)
    moved = _images(pipe, callback=everywhere)
    assert everywhere.guided_steps == 3  # after each of the 4 steps but the last
    assert np.abs(moved - plain).max() > 1e-3
    never = AttentionBindingCallback(nouns=NOUNS, modifiers=MODIFIERS, step_size=0.5, min_timestep=1000)
    np.testing.assert_array_equal(_images(pipe, callback=never), plain)
    assert never.guided_steps == 0
    # a prompt that names none of the nouns is left alone
    nothing = AttentionBindingCallback(nouns=NOUNS, modifiers=MODIFIERS, step_size=0.5, min_timestep=0)
    np.testing.assert_array_equal(_images(pipe, "a blue sky", callback=nothing), _images(pipe, "a blue sky"))


def test_the_callback_tokenizes_a_calls_prompts_once(pipe, monkeypatch):
    """The prompts are the same at every guided step of a call: their tokens are grouped once per call, and again for
    a call with other prompts."""
    import latentdiff.pipelines.attention_binding as module

    grouped = []
    original = module.object_token_groups
    monkeypatch.setattr(module, "object_token_groups", lambda ids, *args: grouped.append(ids) or original(ids, *args))
    callback = AttentionBindingCallback(nouns=NOUNS, modifiers=MODIFIERS, step_size=0.5, min_timestep=0)
    _images(pipe, callback=callback)
    assert callback.guided_steps == 3 and len(grouped) == 1
    _images(pipe, "a green square and a red circle", callback=callback)
    assert callback.guided_steps == 6 and len(grouped) == 2 and grouped[0] != grouped[1]


def test_the_callback_lowers_its_loss(pipe):
    """One guided step lowers the binding loss of the latents it moved (on the tiny random U-Net)."""
    callback = AttentionBindingCallback(nouns=NOUNS, modifiers=MODIFIERS, step_size=0.05, min_timestep=0)
    pipe.scheduler.set_timesteps(4)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    embeds = pipe.encode_prompt([PROMPT] * 2, "cpu", 1, False)[0]
    pipe._call_prompts = [PROMPT] * 2
    try:
        def loss_of(z):
            t = pipe.scheduler.timesteps[1]
            with cross_attention_maps([pipe.unet]) as maps, torch.no_grad():
                pipe.unet(z, t, encoder_hidden_states=embeds)
            from latentdiff.pipelines.attention_binding import _on_finest_grid

            groups, lengths = callback._prompt_groups(pipe, 2)
            return binding_loss(_on_finest_grid(maps), groups, lengths)

        before = loss_of(latents)
        moved = callback(pipe, 0, pipe.scheduler.timesteps[0], {"latents": latents, "prompt_embeds": embeds})["latents"]
        after = loss_of(moved)
    finally:
        pipe._call_prompts = None
    assert (after < before).all(), (before, after)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "needs the nouns"),
        ({"nouns": "square"}, TypeError, "lists of words"),
        ({"nouns": NOUNS, "step_size": -1}, ValueError, "step_size must be a number >= 0"),
        ({"nouns": NOUNS, "min_timestep": -5}, ValueError, "min_timestep must be"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        AttentionBindingCallback(**kwargs)


def test_prompt_embeddings_without_prompts_are_a_clear_error(pipe):
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    callback = AttentionBindingCallback(nouns=NOUNS, step_size=0.5, min_timestep=0)
    with pytest.raises(ValueError, match="reads the call's prompts"):
        pipe(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, callback_on_step_end=callback)


def test_the_attention_maps_bench_reads_the_two_nouns_of_each_image(pipe):
    """bench/attention_maps.py: one record per step above its timestep for a prompt naming two objects, none for one
    object; its measures are shares in [0, 1]; the outcomes are the eval breakdown's."""
    from latentdiff.testing import load_bench_script

    script = load_bench_script("attention_maps")
    call = {"num_inference_steps": 4, "guidance_scale": 2.0}
    jobs = [(PROMPT, 3), ("a red square", 4)]
    records = script.measure(pipe, jobs, NOUNS, MODIFIERS, min_timestep=0, call=call)
    assert len(records[0]) == 3 and records[1] == []
    for timestep, overlap, flatness, share in records[0]:
        assert 0 <= overlap <= 1 + 1e-6 and 0 < flatness <= 1 + 1e-6 and 0 < share <= 1 + 1e-6
    judged = {"objects": [{"color": "red", "shape": "square"}, {"color": "green", "shape": "square"}]}
    images = [{"task": "two_objects", "prompt": PROMPT, "passed": False, "judged": judged}]
    table = script.summarize(images, records[:1])
    assert list(table) == ["one shape for both"] and len(table["one shape for both"]["t < 600 overlap"]) >= 1


def test_the_binding_eval_bench_guides_every_call_of_the_eval_and_writes_its_results(tmp_path):
    """The callback reaches every pipeline call of the eval through evaluate_model's callback_on_step_end."""
    from latentdiff.testing import load_bench_script

    LatentPipeline(**tiny_components(seed=0)).save_pretrained(tmp_path / "model", model_card=False)
    script = load_bench_script("attention_binding_eval")
    guided = script.main([str(tmp_path / "model"), "--out", str(tmp_path / "eval"), "--step-size", "0.05",
                          "--min-timestep", "0", "--images-per-prompt", "1", "--steps", "2", "--max-prompts-per-task", "1"])
    assert guided > 0 and (tmp_path / "eval" / "results.json").is_file()
    sampler = json.loads((tmp_path / "eval" / "results.json").read_text())["sampler"]
    assert sampler["callback_on_step_end"] == "AttentionBindingCallback"


def test_recording_only_the_named_blocks_of_a_unet_also_under_a_wrapper(pipe):
    """``blocks``: the cross-attention layers of those top-level blocks only, found past a DDP-style wrapper."""
    unet = pipe.unet
    latents = torch.randn(1, unet.config.in_channels, 8, 8)
    context = torch.randn(1, 5, unet.config.cross_attention_dim)
    wrapper = torch.nn.Module()
    wrapper.module = unet  # what DistributedDataParallel's named_modules() looks like
    counts = {}
    for blocks in ((), ("up_blocks",), ("mid_block", "up_blocks")):
        with torch.no_grad(), cross_attention_maps([wrapper], blocks=blocks) as maps:
            unet(latents, 10, encoder_hidden_states=context)
        counts[blocks] = len(maps)
    names = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert counts[()] == len(names)
    assert counts[("up_blocks",)] == sum(name.startswith("up_blocks.") for name in names) > 0
    assert counts[("up_blocks",)] < counts[("mid_block", "up_blocks")] < counts[()]


def test_a_compiled_unet_records_the_eager_maps_in_one_graph_kept_across_steps():
    """A recorder installed for the run and a ``torch.compile``-d U-Net (``train.compile`` with the token loss): the
    whole forward traces as one graph with the recording in it (``fullgraph``), a second step runs that graph again
    (``error_on_recompile``), its maps and their gradient are the eager U-Net's, and outside ``recording()`` the
    stock processors run and nothing is recorded. ``aot_eager`` traces forward and backward as inductor would,
    without generating code."""
    import torch._dynamo

    from latentdiff.pipelines.attention_binding import CrossAttentionRecorder

    unet = tiny_components(seed=0)["unet"].train()
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 900])
    stock = unet.attn_processors
    recorder = CrossAttentionRecorder([unet]).install()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    key_weight = next(p for name, p in unet.named_parameters() if name.endswith("attn2.to_k.weight"))

    def step(model):
        with recorder.recording() as maps:
            output = model(latents, timesteps, encoder_hidden_states=context).sample
        loss = output.pow(2).mean() + sum(layer.pow(2).mean() for layer in maps)
        gradient = torch.autograd.grad(loss, key_weight)[0]  # reached only through the maps and the layer's output
        return [layer.detach() for layer in maps], gradient

    try:
        torch._dynamo.reset()
        eager_maps, eager_gradient = step(unet)
        step(compiled)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled_maps, compiled_gradient = step(compiled)
    finally:
        torch._dynamo.reset()
    assert len(compiled_maps) == len(eager_maps) == sum(name.endswith("attn2.processor") for name in stock) > 0
    for compiled_layer, eager_layer in zip(compiled_maps, eager_maps):
        torch.testing.assert_close(compiled_layer, eager_layer)
    torch.testing.assert_close(compiled_gradient, eager_gradient)
    assert eager_gradient.abs().sum() > 0
    with torch.no_grad():
        unet(latents, timesteps, encoder_hidden_states=context)  # not recording: the stock processors, no maps
    assert len(recorder.maps) == len(eager_maps) and compiled_maps[0].shape == recorder.maps[0].shape
    recorder.remove()
    assert {name: type(p) for name, p in unet.attn_processors.items()} == {name: type(p) for name, p in stock.items()}
