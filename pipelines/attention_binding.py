"""Attention binding guidance: the latents nudged, at the high-noise steps of sampling, so that every object the
prompt names gets its own place in the U-Net's cross-attention and its attributes attend where it does.

A text-to-image model can read every word of "a red square and a green circle" and still draw one shape for both
objects, one color for both, or leave one out: at the high noise levels, where the layout is decided, the two
nouns attend to the same pixels. Three published inference-time fixes act on those cross-attention maps by a
gradient step on the latents between denoising steps, with the model frozen:

* Chefer et al. 2023, "Attend-and-Excite" (Sec. 3): every subject noun should be the most attended token somewhere,
  loss ``max_s (1 - max_p A_s(p))`` (the neglected noun);
* Rassin et al. 2023, "Linguistic Binding in Diffusion Models" (SynGen, Sec. 3): a modifier's attention map should
  match its noun's (here ``1 - overlap``);
* Li et al. 2023, "Divide & Bind", and Phung et al. 2023, "Grounded Text-to-Image Synthesis with Attention
  Refocusing": different objects should attend to different pixels (here the overlap of two nouns' maps).

``overlap(P, Q) = sum_p min(P(p), Q(p))`` of two maps normalized to sum 1 over the pixels (1 - total variation).

Written here because Diffusers has no such callback: its Attend-and-Excite pipeline is deprecated, runs its own
denoising loop (not a pipeline of latentdiff's, with its saved sampling defaults and noise-level experts), and its
``AttentionStore`` averages the maps over the whole batch. This is a Diffusers :class:`PipelineCallback`: it runs
after a denoising step and returns the latents of the next one, so it works with any scheduler and any pipeline
built on Stable Diffusion's loop. The cross-attention probabilities are recorded where the ``attn2`` modules compute
them: inside :func:`cross_attention_maps` (or a :class:`CrossAttentionRecorder` kept for a training run), a module
with one of Diffusers' stock processors runs Diffusers' ``AttnProcessor``'s explicit path, whose
``get_attention_scores`` yields them once for both the output and the record; a module with any other processor
keeps it, and a forward pre-hook recomputes its probabilities from its inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.callbacks import PipelineCallback
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

__all__ = [
    "AttentionBindingCallback",
    "CrossAttentionRecorder",
    "binding_loss",
    "cross_attention_maps",
    "object_token_groups",
    "word_token_ids",
]


def word_token_ids(tokenizer, words: Iterable[str]) -> dict[tuple[int, ...], str]:
    """Each word's token ids as the tokenizer reads it inside a prompt (CLIP splits "triangles" in two)."""
    return {tuple(tokenizer(word, add_special_tokens=False)["input_ids"]): word for word in words}


def object_token_groups(
    input_ids: Sequence[int], nouns: Iterable[Sequence[int]], modifiers: Iterable[Sequence[int]]
) -> list[tuple[list[int], list[int]]]:
    """The objects a tokenized prompt names: ``(modifier positions, noun positions)`` for every noun (a word given
    as its token ids), its modifiers being the run of modifier words right before it ("two small yellow squares":
    small and yellow for squares). Longer words are matched first."""
    words = sorted([(tuple(ids), "noun") for ids in nouns] + [(tuple(ids), "modifier") for ids in modifiers],
                   key=lambda entry: -len(entry[0]))
    groups, pending, position = [], [], 0
    while position < len(input_ids):
        match = next(((ids, kind) for ids, kind in words
                      if ids and tuple(input_ids[position:position + len(ids)]) == ids), None)
        if match is None:
            pending, position = [], position + 1
            continue
        ids, kind = match
        positions = list(range(position, position + len(ids)))
        if kind == "noun":
            groups.append((pending, positions))
            pending = []
        else:
            pending = pending + positions
        position += len(ids)
    return groups


def _record_head_mean(maps: list[torch.Tensor], probabilities: torch.Tensor, batch: int) -> None:
    """Append ``probabilities`` ``(batch * heads, pixels, tokens)`` averaged over the heads."""
    maps.append(probabilities.view(batch, -1, *probabilities.shape[1:]).mean(1))


class _RecordingAttnProcessor(AttnProcessor):
    """Diffusers' ``AttnProcessor`` (the probabilities computed explicitly by the module's ``get_attention_scores``,
    not by a fused kernel) that appends each cross-attention call's probabilities to its recorder's ``maps`` while
    the recorder is recording; otherwise the module's own processor runs.

    Why not a hook beside the stock processor: the fused ``AttnProcessor2_0`` never materializes the probabilities,
    so a hook has to compute the queries, keys and scores a second time, forward and backward. On the shapes default
    (2-core Xeon, ``bench/stage2_step_cost.py --recomputed-maps``, two runs) the token loss's step costs 390-403 ms
    with the hooks and 379-390 ms recorded here, against 360-366 ms without the loss: about half of what the loss
    added (the rest is the loss itself and the explicit path in place of the fused one; a cross-attention's score
    matrix is only pixels x tokens).

    Why ``AttnProcessor``'s cross-attention path is restated here rather than called with the module's
    ``get_attention_scores`` shadowed for the call: TorchDynamo cannot trace a method deleted from and set on the
    module at each call, so a ``torch.compile``-d U-Net could not record its maps (``train.compile`` with the token
    loss)."""

    def __init__(self, recorder: CrossAttentionRecorder, original: Any):
        self.recorder = recorder
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.recorder.recording_now or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch, tokens, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, attention_mask)
        _record_head_mean(self.recorder.maps, probabilities, batch)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _top_level_block(name: str) -> str:
    """The U-Net's top-level block a module's qualified name lies in, past a DDP (``module.``) or ``torch.compile``
    (``_orig_mod.``) wrapper's prefix."""
    parts = name.split(".")
    while parts and parts[0] in ("module", "_orig_mod"):
        parts = parts[1:]
    return parts[0] if parts else ""


class CrossAttentionRecorder:
    """Records the cross-attention (``attn2``) probabilities of these U-Nets, averaged over the heads, into
    :attr:`maps` while :meth:`recording`: one tensor ``(batch, height * width, tokens)`` per call, differentiable with
    respect to the U-Net's input.

    :meth:`install` (or ``with recorder:``) sets it up on the modules and :meth:`remove` gives every module its
    processor back. A module with one of Diffusers' stock processors (``AttnProcessor``, ``AttnProcessor2_0``) gets a
    recording ``AttnProcessor`` (the same function, the probabilities computed once) that runs the stock processor
    when not recording; any other processor (LoRA, IP-Adapter, a user's own) is kept, and a forward pre-hook
    recomputes the probabilities from the module's inputs. ``recompute=True`` recomputes every module's probabilities
    that way (for comparison: the step cost benchmark, the tests). ``blocks``: only the modules of these top-level
    blocks of the U-Net (``down_blocks``, ``mid_block``, ``up_blocks``; a DDP or ``torch.compile`` wrapper's prefix
    is skipped); empty: every one.

    Installed once and kept for a training run, the processors are the same objects at every step, so a
    ``torch.compile``-d U-Net traces the recording once (a context that installed new processors at each step would
    make TorchDynamo recompile)."""

    def __init__(self, unets: Iterable[torch.nn.Module], recompute: bool = False, blocks: Sequence[str] = ()):
        self.maps: list[torch.Tensor] = []
        self.recording_now = False
        self.modules = [
            module for unet in unets for name, module in unet.named_modules()
            if name.endswith("attn2") and (not blocks or _top_level_block(name) in blocks)
        ]
        self.recompute = recompute
        self._saved: list[tuple[torch.nn.Module, Any]] = []
        self._handles: list[Any] = []

    def _record(self, module, args, kwargs) -> None:
        """The forward pre-hook of a module whose processor is kept: its probabilities, recomputed from its inputs."""
        if not self.recording_now:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 1:
            context = args[1]
        if context is None or hidden_states.ndim != 3:
            return
        if module.norm_cross is not None:
            context = module.norm_encoder_hidden_states(context)
        query = module.head_to_batch_dim(module.to_q(hidden_states))
        key = module.head_to_batch_dim(module.to_k(context))
        _record_head_mean(self.maps, module.get_attention_scores(query, key, None), hidden_states.shape[0])

    def install(self) -> CrossAttentionRecorder:
        if self._saved or self._handles:
            raise RuntimeError("this CrossAttentionRecorder is already installed")
        for module in self.modules:
            if not self.recompute and type(module.processor) in (AttnProcessor, AttnProcessor2_0):
                self._saved.append((module, module.processor))
                module.processor = _RecordingAttnProcessor(self, module.processor)
            else:
                self._handles.append(module.register_forward_pre_hook(self._record, with_kwargs=True))
        return self

    def remove(self) -> None:
        for module, processor in self._saved:
            module.processor = processor
        for handle in self._handles:
            handle.remove()
        self._saved, self._handles = [], []

    def __enter__(self) -> CrossAttentionRecorder:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    @contextlib.contextmanager
    def recording(self):
        """Within this context, the calls are recorded: :attr:`maps` is emptied on entry and yielded."""
        self.maps.clear()
        self.recording_now = True
        try:
            yield self.maps
        finally:
            self.recording_now = False


@contextlib.contextmanager
def cross_attention_maps(unets: Iterable[torch.nn.Module], recompute: bool = False, blocks: Sequence[str] = ()):
    """Within this context, every cross-attention (``attn2``) call of these U-Nets appends its attention
    probabilities, averaged over the heads, to the yielded list: one tensor ``(batch, height * width, tokens)`` per
    call (:class:`CrossAttentionRecorder`, installed for the context and recording). Every module gets its processor
    back on exit."""
    with CrossAttentionRecorder(unets, recompute, blocks) as recorder, recorder.recording() as maps:
        yield maps


def _on_finest_grid(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The layers' maps ``(batch, pixels, tokens)`` brought to the finest square grid among them and averaged."""
    side = max(int(round(m.shape[1] ** 0.5)) for m in maps)
    resized = []
    for m in maps:
        s = int(round(m.shape[1] ** 0.5))
        grid = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], s, s)
        if s != side:
            grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
        resized.append(grid.flatten(2))  # (batch, tokens, pixels)
    return torch.stack(resized).mean(0)


def _overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.minimum(p, q).sum(-1)


def binding_loss(
    maps: torch.Tensor,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    text_lengths: Sequence[int],
    separation_weight: float = 1.0,
    binding_weight: float = 1.0,
) -> torch.Tensor:
    """The loss of each image (a tensor of ``batch`` values) from its cross-attention ``maps`` ``(batch, tokens,
    pixels)``: Attend-and-Excite's neglect term (one minus the largest share of a pixel's attention that the words of
    the least attended object get), plus the overlap of every two objects' noun maps times
    ``separation_weight``, plus one minus the overlap of each modifier's map with its noun's times ``binding_weight``.
    ``text_lengths[i]``: the position of image ``i``'s end token; the maps are renormalized over the text tokens
    between the start token and it (the start token takes most of the attention, as in Stable Diffusion)."""
    losses = []
    for image, (image_groups, length) in enumerate(zip(groups, text_lengths)):
        if not image_groups:
            losses.append(maps.new_zeros(()))
            continue
        text = maps[image, 1:length]
        text = text / text.sum(0, keepdim=True).clamp_min(1e-8)  # per pixel, a distribution over the words

        def row(positions):  # the attention of these tokens together, per pixel
            return sum(text[p - 1] for p in positions)

        def normalized(positions):
            summed = row(positions)
            return summed / summed.sum().clamp_min(1e-8)

        # Attend-and-Excite's term for the object as a whole: its words' share of the attention at its best pixel.
        neglect = torch.stack([1 - row([*mods, *noun]).max() for mods, noun in image_groups]).max()
        loss = neglect
        nouns = [noun for _, noun in image_groups]
        pairs = [(a, b) for i, a in enumerate(nouns) for b in nouns[i + 1:]]
        if pairs and separation_weight:
            loss = loss + separation_weight * torch.stack([_overlap(normalized(a), normalized(b)) for a, b in pairs]).mean()
        bound = [([m], noun) for mods, noun in image_groups for m in mods]
        if bound and binding_weight:
            loss = loss + binding_weight * torch.stack([1 - _overlap(normalized(m), normalized(n)) for m, n in bound]).mean()
        losses.append(loss)
    return torch.stack(losses)


class AttentionBindingCallback(PipelineCallback):
    r"""After each denoising step whose next timestep is at least `min_timestep`, move every image's latents by
    `step_size` (in units of the gradient's root mean square, per image) down the gradient of :func:`binding_loss`,
    computed by one forward pass of the denoiser on the conditional prompt embeddings.

    Args:
        nouns: the words that name an object ("square", "squares"); a prompt's nouns are found among its tokens.
        modifiers: the words that describe the noun they precede ("red", "small").
        step_size: latents moved per guided step, as a multiple of the gradient's per-image RMS; 0 turns it off. On the
            shapes models measured, 0.2 broke images and 0.05 traded tasks (docs/conditioning.md, forty-third round).
        min_timestep: guided while the next step's timestep is at least this (training scale, 0 .. 999): the high
            noise levels, where the layout is decided.
        separation_weight, binding_weight: the weights of the two overlap terms of :func:`binding_loss`.

    Examples:
        ```py
        >>> from latentdiff.pipelines import LatentPipeline
        >>> from latentdiff.pipelines.attention_binding import AttentionBindingCallback

        >>> pipe = LatentPipeline.from_pretrained("runs/shapes/pipeline")
        >>> binding = AttentionBindingCallback(nouns=["square", "circle"], modifiers=["red", "green"])
        >>> image = pipe("a red square and a green circle", callback_on_step_end=binding).images[0]
        ```
    """

    tensor_inputs = ["latents", "prompt_embeds"]

    @register_to_config
    def __init__(
        self,
        nouns: Sequence[str] = (),
        modifiers: Sequence[str] = (),
        step_size: float = 0.05,
        min_timestep: float = 600,
        separation_weight: float = 1.0,
        binding_weight: float = 1.0,
    ):
        super().__init__(cutoff_step_ratio=1.0)
        if isinstance(nouns, str) or isinstance(modifiers, str):
            raise TypeError("nouns and modifiers are lists of words, e.g. nouns=['square', 'circle']; got a string")
        if not nouns:
            raise ValueError("attention binding needs the nouns that name objects (nouns=['square', ...]); got none")
        for name, value in (("step_size", step_size), ("separation_weight", separation_weight),
                            ("binding_weight", binding_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(min_timestep, (int, float)) or isinstance(min_timestep, bool) or min_timestep < 0:
            raise ValueError(f"min_timestep must be a training timestep >= 0, got {min_timestep!r}")
        self.guided_steps = 0  # how many times it moved the latents (all calls together)
        self._prompt_cache: tuple = (None, (), [])  # (tokenizer, prompts, their object groups and end positions)

    def _prompt_groups(self, pipeline, batch: int):
        """The object groups and end-token positions of the batch's prompts (the call's, which latentdiff's pipelines
        keep as `_call_prompts` during a call), tokenized as `encode_prompt` tokenizes them."""
        prompts = getattr(pipeline, "_call_prompts", None)
        if prompts is None:
            raise ValueError("AttentionBindingCallback reads the call's prompts: call a latentdiff pipeline with prompt=..., "
                             "not prompt_embeds")
        tokenizer = pipeline.tokenizer
        # A call's prompts are the same at every guided step: tokenized once per call, not once per step.
        cached_tokenizer, cached_prompts, per_prompt = self._prompt_cache
        if cached_tokenizer is not tokenizer or cached_prompts != tuple(prompts):
            nouns = word_token_ids(tokenizer, self.config.nouns)
            modifiers = word_token_ids(tokenizer, self.config.modifiers)
            per_prompt = []
            for prompt in prompts:
                ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
                per_prompt.append((object_token_groups(ids, nouns, modifiers), len(ids) - 1))
            self._prompt_cache = (tokenizer, tuple(prompts), per_prompt)
        if batch % len(per_prompt):
            raise RuntimeError(f"{batch} latents for {len(per_prompt)} prompts")
        repeat = batch // len(per_prompt)
        expanded = [entry for entry in per_prompt for _ in range(repeat)]  # Diffusers repeats each prompt in place
        return [g for g, _ in expanded], [n for _, n in expanded]

    def next_guided_timestep(self, pipeline, step_index: int):
        """The timestep of the step after `step_index` if it is at least `min_timestep`, else None."""
        timesteps = pipeline.scheduler.timesteps
        if step_index + 1 >= len(timesteps) or float(timesteps[step_index + 1]) < self.config.min_timestep:
            return None
        return timesteps[step_index + 1]

    @staticmethod
    def denoisers(pipeline) -> list[torch.nn.Module]:
        """The pipeline's U-Nets (with a high-noise expert, both), whose cross-attention maps are read."""
        return [m for m in (pipeline.unet, getattr(pipeline, "unet_high_noise", None)) if m is not None]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict[str, Any]:
        next_timestep = self.next_guided_timestep(pipeline, step_index)
        if not self.config.step_size or next_timestep is None:
            return callback_kwargs
        latents, prompt_embeds = callback_kwargs["latents"], callback_kwargs["prompt_embeds"]
        batch = latents.shape[0]
        context = prompt_embeds[-batch:]  # the conditional half when the batch carries guidance's negative half too
        groups, lengths = self._prompt_groups(pipeline, batch)
        if not any(groups):
            return callback_kwargs
        with torch.enable_grad(), cross_attention_maps(self.denoisers(pipeline)) as recorded:
            sample = latents.detach().requires_grad_(True)
            model_input = pipeline.scheduler.scale_model_input(sample, next_timestep)
            pipeline.unet(model_input, next_timestep, encoder_hidden_states=context, return_dict=False)
            if not recorded:
                raise RuntimeError("the U-Net has no cross-attention (attn2) layer to guide")
            maps = _on_finest_grid(recorded)
            loss = binding_loss(maps, groups, lengths, self.config.separation_weight, self.config.binding_weight)
            (gradient,) = torch.autograd.grad(loss.sum(), sample)
        rms = gradient.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, *[1] * (latents.ndim - 1))
        moved = latents - self.config.step_size * gradient / rms * (rms > 1e-12)
        callback_kwargs["latents"] = moved.to(latents.dtype)
        self.guided_steps += 1
        return callback_kwargs
