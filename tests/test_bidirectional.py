"""The bidirectional CLIP text encoder (`model.text_encoder.bidirectional`): every token reads the whole caption."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff import BidirectionalCLIPTextModel, CLIPTextModelWithWordEmbeddings

BOS, EOS = 98, 99
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_attention_heads=4, max_position_embeddings=12,
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)  # fmt: skip


def caption(*words: int, length: int = 12, pad: int = EOS) -> list[int]:
    return [BOS, *words, EOS] + [pad] * (length - len(words) - 2)


def pair(layers: int, cls=BidirectionalCLIPTextModel):
    """A causal CLIPTextModel and a bidirectional model of `cls` with the same weights."""
    torch.manual_seed(0)
    causal = CLIPTextModel(CLIPTextConfig(**TINY, num_hidden_layers=layers)).eval()
    bidirectional = cls(CLIPTextConfig(**TINY, num_hidden_layers=layers, bidirectional=True)).eval()
    bidirectional.load_state_dict(causal.state_dict())
    return causal, bidirectional


@torch.no_grad()
def test_a_token_reads_the_words_after_it_and_the_end_of_text_reads_what_clip_reads():
    """"red circle below" / "red circle above": under CLIP's causal mask the subject's states are the same in both,
    without it they differ. The end-of-text token sees the same keys either way, so with one layer its state (the
    pooled output) is CLIPTextModel's, which checks that only the causal part of the mask was taken away."""
    causal, bidirectional = pair(layers=1)
    ids = torch.tensor([caption(5, 6, 7, 8), caption(5, 6, 9, 8)])  # differ in the third word only
    before, after = causal(ids), bidirectional(ids, output_hidden_states=True)
    assert torch.equal(before.last_hidden_state[0, :3], before.last_hidden_state[1, :3])
    assert not torch.allclose(after.last_hidden_state[0, 1:3], after.last_hidden_state[1, 1:3], atol=1e-4)
    torch.testing.assert_close(after.pooler_output, before.pooler_output)
    torch.testing.assert_close(after.last_hidden_state[:, 5], before.last_hidden_state[:, 5])  # the end of text
    torch.testing.assert_close(after.hidden_states[0], causal.embeddings(input_ids=ids))
    assert len(after.hidden_states) == 2
    tuple_output = bidirectional(ids, return_dict=False)
    assert torch.equal(tuple_output[0], after.last_hidden_state) and torch.equal(tuple_output[1], after.pooler_output)


@torch.no_grad()
def test_padding_is_masked():
    """A caption's states up to its end of text do not depend on the padding: its length or its token."""
    _, bidirectional = pair(layers=2)
    states = bidirectional(torch.tensor([caption(5, 6, 7)])).last_hidden_state
    shorter = bidirectional(torch.tensor([caption(5, 6, 7, length=7)])).last_hidden_state
    other_pad = bidirectional(torch.tensor([caption(5, 6, 7, pad=0)])).last_hidden_state
    torch.testing.assert_close(shorter[:, :5], states[:, :5])
    torch.testing.assert_close(other_pad[:, :5], states[:, :5])
    masked = bidirectional(torch.tensor([caption(5, 6, 7)]), attention_mask=torch.tensor([[1] * 4 + [0] * 8]))
    assert not torch.allclose(masked.last_hidden_state[:, :4], states[:, :4])  # the end of text masked too


@torch.no_grad()
def test_without_the_option_it_is_clip():
    torch.manual_seed(0)
    causal = CLIPTextModel(CLIPTextConfig(**TINY, num_hidden_layers=2)).eval()
    plain = BidirectionalCLIPTextModel(CLIPTextConfig(**TINY, num_hidden_layers=2)).eval()
    plain.load_state_dict(causal.state_dict())
    ids = torch.tensor([caption(5, 6, 7)])
    assert not plain.bidirectional
    torch.testing.assert_close(plain(ids).last_hidden_state, causal(ids).last_hidden_state)


@torch.no_grad()
def test_word_embeddings_beside_the_bidirectional_layer():
    """`word_embeddings_in_context` with `bidirectional`: the word path is unchanged, the layer path is bidirectional."""
    _, bidirectional = pair(layers=1)
    _, both = pair(layers=1, cls=CLIPTextModelWithWordEmbeddings)
    ids = torch.tensor([caption(5, 6, 7, 8)])
    words, states = both(ids)[0].split([32, 32], dim=-1)
    torch.testing.assert_close(states, bidirectional(ids).last_hidden_state)
    torch.testing.assert_close(words, both.final_layer_norm(both.embeddings(input_ids=ids)))


def test_bad_settings_are_rejected():
    from latentdiff.config import ConfigError, load_config

    with pytest.raises(ValueError, match="bidirectional is 'yes'; expected true or false"):
        BidirectionalCLIPTextModel(CLIPTextConfig(**TINY, num_hidden_layers=1, bidirectional="yes"))
    with pytest.raises(ConfigError, match="model.text_encoder.bidirectional.*OpenCLIP"):
        load_config(None, ["model.text_encoder.kind=open_clip", "model.text_encoder.bidirectional=true"])
    _, bidirectional = pair(layers=1)
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        bidirectional(torch.tensor([caption(5)]), output_attentions=True)
