"""The latent cache keeps each latent with its own image's captions; the frozen text encoder's
embedding cache encodes each caption once, gives the same values, and bounds its memory."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image

from latentdiff.config import DataConfig
from latentdiff.data.loading import make_training_dataset
from latentdiff.trainer.latent_cache import (
    CachedLatentDataset,
    TextEmbeddingCache,
    cache_key,
    collate_latents,
    encode_posteriors,
)
from latentdiff.trainer.encoding import tokenize

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


SOLID_COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


class PixelsAsLatents:
    """Stands in for an ``AutoencoderKL`` whose posterior mean is the image itself (std 0.5), so a
    cached latent shows which image it came from."""

    config = SimpleNamespace(scaling_factor=2.0, shift_factor=None)
    dtype = torch.float32

    def encode(self, pixel_values):
        latent_dist = SimpleNamespace(mean=pixel_values, std=torch.full_like(pixel_values, 0.5))
        return SimpleNamespace(latent_dist=latent_dist)


def test_cached_latents_keep_their_own_captions(tmp_path, monkeypatch):
    """A broken image early in the folder shifts every later latent's position in the cache against its
    dataset index; each latent must still come with the captions of the image it was encoded from."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = []
    for number, color in enumerate([*SOLID_COLORS, *SOLID_COLORS]):
        if number == 1:
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
            rows.append({"file_name": "broken.png", "captions": ["a broken picture"]})
        Image.new("RGB", (8, 8), SOLID_COLORS[color]).save(folder / f"{number}.png")
        rows.append({"file_name": f"{number}.png", "captions": [f"a {color} picture", f"{color} all over"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    data = DataConfig(source="imagefolder", name=str(folder), caption_column="captions", resolution=8)
    dataset = make_training_dataset(data, seed=0)
    cache = encode_posteriors(dataset, PixelsAsLatents(), batch_size=3, device="cpu")
    assert len(cache["index"]) == 2 * len(SOLID_COLORS)  # the broken image is left out
    cached = CachedLatentDataset(cache, dataset)
    for epoch in range(2):
        cached.set_epoch(epoch)
        batch = collate_latents([cached[position] for position in range(len(cached))])
        assert torch.equal(batch["latent_std"], torch.ones_like(batch["latent_std"]))  # 0.5 * scaling factor 2
        for latent, caption in zip(batch["latent_mean"], batch["captions"]):
            color = caption.split()[1] if caption.startswith("a ") else caption.split()[0]
            expected = 2.0 * (torch.tensor(SOLID_COLORS[color], dtype=torch.float32) / 127.5 - 1)
            assert torch.allclose(latent.mean(dim=(1, 2)), expected, atol=0.05), (caption, latent.mean(dim=(1, 2)))


def test_the_cache_key_is_the_autoencoder_not_the_folder_it_was_read_from(tmp_path):
    """The low-noise expert stage reads the autoencoder from stage 2's pipeline folder and must find the cache
    that stage 2 built from stage 1's folder; other weights or other data must not."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    data = DataConfig(source="shapes", resolution=8)
    from_stage1 = AutoencoderKL.from_pretrained(tmp_path / "vae")
    from_pipeline = AutoencoderKL.from_pretrained(tmp_path / "pipeline", subfolder="vae")
    assert from_stage1.config._name_or_path != from_pipeline.config._name_or_path
    assert cache_key(data, from_stage1) == cache_key(data, from_pipeline)
    with torch.no_grad():
        from_pipeline.decoder.conv_out.bias.add_(1.0)  # a decoder change leaves the latents alone, but is another model
    assert cache_key(data, from_stage1) != cache_key(data, from_pipeline)
    assert cache_key(data, from_stage1) != cache_key(DataConfig(source="shapes", resolution=16), from_stage1)


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
