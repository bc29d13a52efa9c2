"""A short causal convolution over a CLIP text encoder's token embeddings: each word reads the words just before it.

Without transformer layers (the shapes default: ``num_hidden_layers: 0``) a token's state is its word and position
embedding alone. In "a yellow square and a green circle" the state of "square" then says nothing of "yellow": the
U-Net has to tie each color to its shape through the position embeddings and its own attention, and on the
built-in shapes data it mostly does not (two objects, relation and color binding 0.16-0.36 for the main job's model;
docs/conditioning.md). One transformer layer binds colors to shapes given enough steps, but its attention starts
random and global, and at the main job's budget it cost more than it bought (thirty-ninth round).

The adjectives of these captions come right before their noun ("two small yellow squares"), so binding needs only
a short, local mix. :class:`CLIPTextEmbeddingsWithTokenMixing` adds to each token's embedding a causal convolution
over it and the ``width - 1`` tokens before it, zero-initialized: the encoder starts exactly as the one without it
and learns how much of its neighbours each word takes in. Short convolutions mixing neighbouring tokens are Primer's
(So et al. 2021, "Primer: Searching for Efficient Transformers for Language Modeling": a width-3 depthwise
convolution after each attention projection) and H3's shift convolution (Fu et al. 2023, "Hungry Hungry Hippos");
here the convolution mixes the channels too, so that a color's features can move into the noun's. It is causal as
CLIP is: a caption's states do not depend on the padding after it, nor on the context length it was padded to.
On the main job's stage 2 it binds (width 2: color binding 0.17 -> 0.34) and costs places (0.96 -> 0.44;
docs/conditioning.md, fortieth round); trained from the middle of stage 2 on (``train.token_mixing_from_step``) it
keeps them (0.94, binding 0.27; forty-first round, one seed), so no preset uses it yet.

Written here because transformers' CLIP has no token mixing outside its attention layers. It replaces the
embeddings module of :class:`~latentdiff.models.bidirectional.BidirectionalCLIPTextModel` when
``config.token_mixing_width`` is set (a ``CLIPTextConfig`` attribute, so the saved folder reloads the same); the
token and position embeddings keep their names in the state dict, the convolution is ``embeddings.token_mixing``
(and its gate, if gated, ``embeddings.token_mixing.gate``).
"""

from __future__ import annotations

import torch
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

__all__ = ["CLIPTextEmbeddingsWithTokenMixing", "CausalTokenMixing"]


class CausalTokenMixing(torch.nn.Module):
    """``[batch, tokens, features] -> [batch, tokens, features]``: token ``i``'s output is a learned linear map of
    tokens ``i - width + 1 .. i`` (zeros before the first), starting at zero."""

    def __init__(self, features: int, width: int, depthwise: bool = False, gated: bool = False):
        super().__init__()
        if width < 2:
            raise ValueError(f"token_mixing_width is {width!r}; expected at least 2 (the token and the one before it)")
        self.width = width
        # depthwise (Primer's): each feature mixes only itself along the tokens, so what a word takes in is its
        # neighbours' embeddings times per-feature gains, with no sum over the 128 features to grow large under Adam
        self.conv = torch.nn.Conv1d(features, features, kernel_size=width, groups=features if depthwise else 1)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)
        # gated: each token's own embedding decides how much of the mix it takes (one sigmoid per token, 0.5 at the
        # start), as in gated convolutional language models (Dauphin et al. 2017, "Language Modeling with Gated
        # Convolutional Networks"), so a noun can take in its color while a place word keeps to itself
        self.gate = torch.nn.Linear(features, 1) if gated else None
        if self.gate is not None:
            torch.nn.init.zeros_(self.gate.weight)
            torch.nn.init.zeros_(self.gate.bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        before = torch.nn.functional.pad(embeddings.transpose(1, 2), (self.width - 1, 0))  # causal: pad on the left
        mixed = self.conv(before).transpose(1, 2)
        if self.gate is not None:
            mixed = self.gates(embeddings).unsqueeze(-1) * mixed
        return mixed

    def gates(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """``[batch, tokens]``: how much of its mix each token takes (gated mixing only; None otherwise)."""
        return None if self.gate is None else torch.sigmoid(self.gate(embeddings)).squeeze(-1)


class CLIPTextEmbeddingsWithTokenMixing(CLIPTextEmbeddings):
    """``CLIPTextEmbeddings`` (word + position) plus :class:`CausalTokenMixing` of that sum."""

    def __init__(self, config):
        super().__init__(config)
        self.token_mixing = CausalTokenMixing(config.hidden_size, config.token_mixing_width,
                                              getattr(config, "token_mixing_depthwise", False),
                                              getattr(config, "token_mixing_gated", False))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        embeddings = super().forward(*args, **kwargs)
        return embeddings + self.token_mixing(embeddings)


def install_token_mixing(text_model: torch.nn.Module, config) -> None:
    """Replace ``text_model.embeddings`` by :class:`CLIPTextEmbeddingsWithTokenMixing`, keeping its word and position
    embeddings (and their initialization)."""
    mixed = CLIPTextEmbeddingsWithTokenMixing(config)
    mixed.token_embedding, mixed.position_embedding = text_model.embeddings.token_embedding, text_model.embeddings.position_embedding
    text_model.embeddings = mixed
