"""A CLIP text encoder whose conditioning keeps the words as they enter it, beside what its layers make of them.

The U-Net cross-attends to per-token text states (Rombach et al. 2022, Sec. 3.3). A text transformer's
layers mix the tokens (each state is an attention-weighted sum over the caption), and on the built-in
shapes data one such layer made the U-Net stop reading the place words while it read the colors
and shapes bound better (docs/conditioning.md, tenth round). :class:`CLIPTextModelWithWordEmbeddings`
gives the U-Net both: for each token, its input embedding (word + position, which no layer has
mixed) and its last-layer state, joined along one of two axes (``config.word_embeddings_axis``):

- ``"features"``: concatenated per token, as Stable Diffusion XL concatenates the states of its two text
  encoders (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
  Synthesis", Sec. 2.1). The U-Net's ``cross_attention_dim`` is twice the encoder's width; a token's key is
  a sum of what both paths say about it.
- ``"tokens"``: the two paths as two sequences, one after the other, as Stable Diffusion 3 joins its CLIP
  and T5 states along the sequence (Esser et al. 2024, "Scaling Rectified Flow Transformers for
  High-Resolution Image Synthesis"). The width stays the encoder's; each query's attention
  weighs a word as it was written and the same word as the layer placed it in context separately.

With ``config.word_path_dropout = p`` the model, in training mode only, zeroes one of the two paths of a
caption at random: the word embeddings with probability ``p``, the layer's states with probability ``p``,
never both. The U-Net then has to read each attribute from either path alone, as Stable Diffusion 3 drops
each of its text encoders' states independently in training (Esser et al. 2024). It is meant to keep
the U-Net from reading one path only: along the tokens and without it, the U-Net stops reading the word
embeddings (place words unread; docs/conditioning.md, twelfth round).

With ``config.word_path_own_projection`` (along the tokens only) each path's tokens keep their features in
a half of their own of ``2 * hidden_size``, the other half zero: ``[word, 0]`` and ``[0, state]``. Along the
tokens both paths otherwise go through the same key and value projections of every cross-attention layer,
where along the features each path has its own columns of them; with this the U-Net's projection of a
token is ``W_words @ word`` or ``W_states @ state``, two projections, and the cross-attention width is
``2 * hidden_size`` as along the features. On the patient preset the U-Net then read the word path only
(docs/conditioning.md, thirteenth round).

With ``config.token_mixing_width`` (:mod:`latentdiff.models.token_mixing`) and no transformer layers, the two paths
are the words before and after the causal token mixing: each noun's state reads the words just before it, and
the words themselves stay in the context as they were written.

It is a ``transformers.CLIPTextModel`` with the same weights (the input embedding goes through the
same final layer norm as the last layer's state, so there is no new parameter), built on
:class:`~latentdiff.models.bidirectional.BidirectionalCLIPTextModel` so that ``config.bidirectional`` runs its
layers without the causal mask: its folder is a CLIP text encoder folder, and a pipeline's
``model_index.json`` lists it as ``["latentdiff", "CLIPTextModelWithWordEmbeddings"]``.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from .bidirectional import BidirectionalCLIPTextModel
from .token_mixing import CLIPTextEmbeddingsWithTokenMixing

__all__ = ["CLIPTextModelWithWordEmbeddings"]


class CLIPTextModelWithWordEmbeddings(BidirectionalCLIPTextModel):
    r"""``CLIPTextModel`` whose ``last_hidden_state`` joins ``LN(embeddings)`` and ``LN(last layer)``.

    ``LN`` is the model's final layer norm and ``embeddings`` the token + position embeddings. With
    ``config.word_embeddings_axis == "features"`` (the default, also for folders saved without it) the
    output has ``2 * hidden_size`` features per token; with ``"tokens"`` it has ``2 * tokens`` tokens of
    ``hidden_size`` features (``2 * hidden_size`` with ``config.word_path_own_projection``), the word
    embeddings first. ``pooler_output`` and ``hidden_states`` are those of ``CLIPTextModel`` (run without the
    causal mask with ``config.bidirectional``);
    :meth:`conditioning` builds the same two-path context from any layer's state (a pipeline's ``clip_skip``).

    Example::

        from transformers import CLIPTextConfig
        from latentdiff.models.word_context import CLIPTextModelWithWordEmbeddings
        encoder = CLIPTextModelWithWordEmbeddings(CLIPTextConfig(hidden_size=128, num_hidden_layers=1))
        encoder(input_ids)[0].shape  # [batch, tokens, 256]
        config = CLIPTextConfig(hidden_size=128, num_hidden_layers=1, word_embeddings_axis="tokens")
        CLIPTextModelWithWordEmbeddings(config)(input_ids)[0].shape  # [batch, 2 * tokens, 128]
    """

    AXES = {"features": -1, "tokens": -2}

    def __init__(self, config, *args, **kwargs):
        axis = getattr(config, "word_embeddings_axis", "features")
        if axis not in self.AXES:
            raise ValueError(f"word_embeddings_axis is {axis!r}; expected one of {sorted(self.AXES)}")
        dropout = getattr(config, "word_path_dropout", 0.0)
        if not 0.0 <= dropout <= 0.5:
            raise ValueError(f"word_path_dropout is {dropout!r}; expected a probability from 0 to 0.5 (per path, never both)")
        own_projection = getattr(config, "word_path_own_projection", False)
        if own_projection and axis != "tokens":
            raise ValueError(f"word_path_own_projection is true with word_embeddings_axis {axis!r}; expected 'tokens' "
                             "(along the features each path already has its own columns of the U-Net's projections)")
        super().__init__(config, *args, **kwargs)
        self.word_embeddings_axis = axis
        self.word_path_dropout = dropout
        self.word_path_own_projection = own_projection

    def conditioning(
        self, hidden_states: tuple[torch.Tensor, ...], layer: int = -1, input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The two-path context from ``hidden_states`` (``output_hidden_states=True``): the input embedding and the
        state of ``layer`` (an index into ``hidden_states``; ``-1``: the last layer), each through the final layer norm,
        joined along ``word_embeddings_axis`` (in training mode, with ``word_path_dropout`` applied first).

        With token mixing (``config.token_mixing_width``) ``hidden_states[0]`` is already mixed; the word path is then
        the embeddings before the mixing, recomputed from ``input_ids`` (required)."""
        norm = self._final_layer_norm()
        return self._join(norm(self._words(hidden_states, input_ids, position_ids)), norm(hidden_states[layer]))

    def _words(self, hidden_states, input_ids, position_ids) -> torch.Tensor:
        embeddings = self._text_model().embeddings
        if not isinstance(embeddings, CLIPTextEmbeddingsWithTokenMixing):
            return hidden_states[0]
        if input_ids is None:
            raise ValueError("a text encoder with token mixing needs the input_ids to build its word path (the "
                             "embeddings before the mixing); pass input_ids=")
        return CLIPTextEmbeddings.forward(embeddings, input_ids=input_ids.view(-1, input_ids.shape[-1]), position_ids=position_ids)

    def _join(self, words: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        if self.training and self.word_path_dropout > 0:
            words, states = self._drop_one_path(words, states)
        if self.word_path_own_projection:  # [word, 0] and [0, state]
            width = words.shape[-1]
            words, states = torch.nn.functional.pad(words, (0, width)), torch.nn.functional.pad(states, (width, 0))
        return torch.cat([words, states], dim=self.AXES[self.word_embeddings_axis])

    def _drop_one_path(self, words: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per caption: zero the words with probability ``p``, else the states with probability ``p``."""
        draw = torch.rand(words.shape[0], 1, 1, device=words.device)
        keep_words = draw >= self.word_path_dropout
        keep_states = (draw < self.word_path_dropout) | (draw >= 2 * self.word_path_dropout)
        return words * keep_words.to(words.dtype), states * keep_states.to(states.dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        return_dict = kwargs.pop("return_dict", None)
        outputs = super().forward(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True,
            return_dict=True, **kwargs,
        )  # fmt: skip
        hidden_states = outputs.hidden_states
        if not hidden_states:  # transformers 5 records no states without layers; the embeddings are the only one
            hidden_states = (self._text_model().embeddings(input_ids=input_ids.view(-1, input_ids.shape[-1]),
                                                           position_ids=position_ids),)
        result = BaseModelOutputWithPooling(
            last_hidden_state=self.conditioning(hidden_states, input_ids=input_ids, position_ids=position_ids),
            pooler_output=outputs.pooler_output,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )
        return result.to_tuple() if return_dict is False else result


# Record the class under its public path, so a pipeline's model_index.json lists it as
# ["latentdiff", "CLIPTextModelWithWordEmbeddings"] and Diffusers finds it after a plain `import latentdiff`
# (Diffusers resolves custom components from already-imported modules only; see latentdiff/__init__.py).
CLIPTextModelWithWordEmbeddings.__module__ = "latentdiff"
