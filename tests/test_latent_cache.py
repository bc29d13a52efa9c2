"""The frozen text encoder's embedding cache: encoded once, same values, bounded memory."""

from __future__ import annotations

import pytest
import torch

from latentdiff.latent_cache import TextEmbeddingCache
from latentdiff.train_utils import tokenize

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a red circle above a blue square", ""]


class CountingEncoder(torch.nn.Module):
    """Wraps a text encoder and counts the captions it encodes."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        self.captions_encoded = 0

    def forward(self, input_ids):
        self.captions_encoded += input_ids.shape[0]
        return self.text_encoder(input_ids)


def direct(components, captions):
    with torch.no_grad():
        return components["text_encoder"](tokenize(components["tokenizer"], captions))[0]


def test_precompute_encodes_each_caption_once_and_steps_never_run_the_encoder(tiny_components):
    encoder = CountingEncoder(tiny_components["text_encoder"])
    cache = TextEmbeddingCache(encoder, tiny_components["tokenizer"], "cpu")
    assert cache.precompute(CAPTIONS + CAPTIONS[:2], batch_size=2, show_progress=False)
    assert encoder.captions_encoded == len(CAPTIONS)
    assert cache.nbytes == len(CAPTIONS) * cache.bytes_per_caption > 0

    batch = ["", "a blue square", "a red circle", ""]
    embeddings = cache(batch)
    assert encoder.captions_encoded == len(CAPTIONS)  # all hits
    torch.testing.assert_close(embeddings, direct(tiny_components, batch), rtol=1e-5, atol=1e-5)
    assert cache.precompute(CAPTIONS, batch_size=3, show_progress=False)  # nothing left to do
    assert encoder.captions_encoded == len(CAPTIONS)


def test_unknown_captions_are_encoded_when_first_seen(tiny_components):
    encoder = CountingEncoder(tiny_components["text_encoder"])
    cache = TextEmbeddingCache(encoder, tiny_components["tokenizer"], "cpu")
    first = cache(["a red circle", "a red circle", ""])
    assert encoder.captions_encoded == 2
    second = cache(["", "a red circle"])
    assert encoder.captions_encoded == 2
    torch.testing.assert_close(second, first[[2, 0]])


def test_memory_bound_keeps_the_cache_lazy_and_the_values_right(tiny_components):
    encoder = CountingEncoder(tiny_components["text_encoder"])
    probe = TextEmbeddingCache(encoder, tiny_components["tokenizer"], "cpu")
    probe.precompute(CAPTIONS[:1], batch_size=1, show_progress=False)
    room_for_two = 2 * probe.bytes_per_caption

    encoder.captions_encoded = 0
    cache = TextEmbeddingCache(encoder, tiny_components["tokenizer"], "cpu", max_bytes=room_for_two)
    assert not cache.precompute(CAPTIONS, batch_size=2, show_progress=False)
    assert encoder.captions_encoded == 1 and cache.nbytes == 0  # measured one embedding, kept none
    assert torch.equal(cache(CAPTIONS[:2]), cache(CAPTIONS[:2]))  # two fit: kept
    assert cache.nbytes == room_for_two
    batch = CAPTIONS[1:4]  # two new ones do not fit any more: encoded for this batch only
    torch.testing.assert_close(cache(batch), direct(tiny_components, batch), rtol=1e-5, atol=1e-5)
    assert cache.nbytes <= cache.max_bytes and set(cache.embeddings) == set(CAPTIONS[:2])


@pytest.mark.parametrize("max_bytes", [-1, 1.5, True])
def test_bad_memory_bound(tiny_components, max_bytes):
    with pytest.raises(ValueError, match="max_bytes must be a non-negative integer"):
        TextEmbeddingCache(tiny_components["text_encoder"], tiny_components["tokenizer"], "cpu", max_bytes=max_bytes)


def test_bad_batch_size(tiny_components):
    cache = TextEmbeddingCache(tiny_components["text_encoder"], tiny_components["tokenizer"], "cpu")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        cache.precompute(CAPTIONS, batch_size=0)
