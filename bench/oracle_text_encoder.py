"""An oracle "text encoder" for the shapes captions: the bottleneck test of docs/conditioning.md.

It reads a caption with the shapes grammar (latentdiff.data.shapes) and returns one token per
slot, each the sum of frozen random embeddings of what the slot holds: the background, the
relation, and up to three objects (count, size, color, shape, position; "none" where the caption
does not say). Binding and parsing are solved by construction, so a U-Net conditioned on it sees
the easiest possible text. If the U-Net follows such prompts within the budget and not real ones,
the text path limits; if not, the U-Net, the objective or the images seen do.

A research instrument, not a product feature: it only understands the shapes captions.
"""

from __future__ import annotations

import re

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from transformers.modeling_outputs import BaseModelOutputWithPooling

from latentdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, RELATION_PHRASES, SHAPES, SIZES
from latentdiff.models.tokenizer import clip_tokenizer

_POSITIONS = sorted(POSITIONS, key=len, reverse=True)  # longest first: "at the top left" before "at the top"
_NOUN_PHRASE = re.compile(
    r"\b(a|an|one|two|three)\s+(?:(" + "|".join(SIZES) + r")\s+)?(?:(" + "|".join(COLORS) + r")\s+)?"
    r"(" + "|".join(SHAPES) + r"|shape)s?\b(?:\s+(" + "|".join(_POSITIONS) + r"))?"
)
_RELATION = re.compile(r"\b(" + "|".join(RELATION_PHRASES.values()) + r")\b")
_BACKGROUND = re.compile(r"\bon an? (" + "|".join(BACKGROUNDS) + r") background\b")
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_RELATION_NAMES = {phrase: name for name, phrase in RELATION_PHRASES.items()}

MAX_OBJECTS = 3
NUM_TOKENS = 2 + MAX_OBJECTS  # background, relation, objects


def parse_caption(caption: str) -> dict:
    """``{"background", "relation", "objects": [{count, size, color, shape, position}]}`` (None = unsaid)."""
    text = caption.lower()
    background = _BACKGROUND.search(text)
    relation = _RELATION.search(text)
    objects = []
    for match in _NOUN_PHRASE.finditer(text):
        determiner, size, color, shape, position = match.groups()
        objects.append({
            "count": _COUNTS[determiner],
            "size": size,
            "color": color,
            "shape": None if shape == "shape" else shape,
            "position": position,
        })
    return {
        "background": background.group(1) if background else None,
        "relation": _RELATION_NAMES[relation.group(1)] if relation else None,
        "objects": objects[:MAX_OBJECTS],
    }


class OracleTextEncoder(ModelMixin, ConfigMixin):
    """Caption token ids (CLIP's) -> ``[batch, 5, hidden_size]`` slot embeddings (see the module docstring)."""

    @register_to_config
    def __init__(self, hidden_size: int = 128, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        vocabularies = {
            "slot": NUM_TOKENS,
            "background": len(BACKGROUNDS) + 1,
            "relation": len(RELATION_PHRASES) + 1,
            "count": 4,  # absent, 1, 2, 3
            "size": len(SIZES) + 1,
            "color": len(COLORS) + 1,
            "shape": len(SHAPES) + 1,
            "position": len(POSITIONS) + 1,
        }
        for name, size in vocabularies.items():
            table = torch.randn((size, hidden_size), generator=generator)
            self.register_buffer(f"{name}_table", table)
        self._tokenizer = None
        self._index = {
            "background": {name: i + 1 for i, name in enumerate(BACKGROUNDS)},
            "relation": {name: i + 1 for i, name in enumerate(RELATION_PHRASES)},
            "size": {name: i + 1 for i, name in enumerate(SIZES)},
            "color": {name: i + 1 for i, name in enumerate(COLORS)},
            "shape": {name: i + 1 for i, name in enumerate(SHAPES)},
            "position": {name: i + 1 for i, name in enumerate(POSITIONS)},
        }

    def _ids(self, caption: str) -> list[list[int]]:
        """Per token: indices into (slot, background, relation, count, size, color, shape, position)."""
        parsed = parse_caption(caption)
        index = self._index
        tokens = [[0, index["background"].get(parsed["background"], 0), 0, 0, 0, 0, 0, 0]]
        tokens.append([1, 0, index["relation"].get(parsed["relation"], 0), 0, 0, 0, 0, 0])
        for slot in range(MAX_OBJECTS):
            if slot < len(parsed["objects"]):
                obj = parsed["objects"][slot]
                tokens.append([
                    2 + slot, 0, 0, obj["count"], index["size"].get(obj["size"], 0),
                    index["color"].get(obj["color"], 0), index["shape"].get(obj["shape"], 0),
                    index["position"].get(obj["position"], 0),
                ])
            else:
                tokens.append([2 + slot, 0, 0, 0, 0, 0, 0, 0])
        return tokens

    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states=None, return_dict=True):
        if self._tokenizer is None:
            self._tokenizer = clip_tokenizer()
        # CLIP's BPE marks word ends with "</w>"; the offline tokenizer's decode keeps the marks, so
        # the words are read from the tokens themselves (special and padding tokens dropped).
        special = {self._tokenizer.bos_token_id, self._tokenizer.eos_token_id, self._tokenizer.pad_token_id}
        captions = [
            "".join(self._tokenizer.convert_ids_to_tokens([i for i in row if i not in special])).replace("</w>", " ").strip()
            for row in input_ids.tolist()
        ]
        ids = torch.tensor([self._ids(caption) for caption in captions], device=self.slot_table.device)
        tables = [
            self.slot_table, self.background_table, self.relation_table, self.count_table,
            self.size_table, self.color_table, self.shape_table, self.position_table,
        ]
        # Unit-variance entries, like a layer-normed transformer output.
        hidden = sum(table[ids[..., k]] for k, table in enumerate(tables)) / len(tables) ** 0.5
        pooled = hidden.mean(dim=1)
        if not return_dict:
            return hidden, pooled
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
