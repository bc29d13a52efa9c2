"""Latents and text embeddings computed once instead of every step.

With a frozen autoencoder, encoding the same image again every epoch is wasted work: the latent cache
stores each image's posterior ``q(z|x) = N(mean, std^2)`` once and the training step samples
``z = mean + std * eps`` from it, so the autoencoder's sampling noise is kept and only the encoder
pass is saved. The images' random crops and flips are those of epoch 0; captions are still drawn
per (seed, epoch, index). The cache is a safetensors file in ``train.cache_dir`` (by default
``<output_dir>/cache/``), named by a hash of what determines its content (the data config and the
VAE's config and weights), written by the main process and read by the others; a resumed or
repeated run, or another run given the same folder, reuses it.

With a frozen text encoder, :class:`TextEmbeddingCache` keeps the embedding of every distinct
caption: the trainer encodes all captions of a map-style dataset before the first step, so that no
step runs the text encoder; with streaming data, each caption is encoded the first time it is seen
(captions repeat across epochs; the empty caption of classifier-free guidance repeats every step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import Config, DataConfig, config_to_dict
from ..data.loading import ImageTextDataset

logger = logging.getLogger(__name__)


def cache_key(data: DataConfig, vae) -> str:
    """A short hash of the data config and the autoencoder (config and weights), not of the folder it was read
    from: the same autoencoder saved in a pipeline folder finds the cache that its own folder built."""
    digest = hashlib.sha256(json.dumps(config_to_dict(data), sort_keys=True).encode())
    vae_config = {key: value for key, value in vae.config.items() if key != "_name_or_path"}
    digest.update(json.dumps(vae_config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageTextDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


def _collate_indexed(items):
    kept = [(index, item) for index, item in items if item is not None]
    return {
        "index": torch.tensor([index for index, _ in kept], dtype=torch.int64),
        "pixel_values": torch.stack([item["pixel_values"] for _, item in kept]) if kept else torch.empty(0),
    }


@torch.no_grad()
def encode_posteriors(dataset: ImageTextDataset, vae, batch_size: int, device, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Posterior mean and std (scaled as training latents are) of every decodable image, by index."""
    from .encoding import latent_scale_and_shift

    scale, shift = latent_scale_and_shift(vae)
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_size=batch_size, shuffle=False, collate_fn=_collate_indexed, num_workers=num_workers
    )
    means, stds, indices = [], [], []
    for batch in tqdm(loader, desc="caching latents"):
        if batch["index"].numel() == 0:
            continue
        posterior = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
        means.append(((posterior.mean - shift) * scale).float().cpu())
        stds.append((posterior.std * scale).float().cpu())
        indices.append(batch["index"])
    if not indices:
        raise ValueError("no image of the dataset could be decoded: nothing to cache")
    # contiguous: the VAE may return channels-last tensors, which safetensors cannot save
    return {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "index": torch.cat(indices)}


def latent_cache_dir(config: Config) -> str:
    """Where a run's latent cache is kept: ``train.cache_dir``, else ``<output_dir>/cache``."""
    return config.train.cache_dir or os.path.join(config.output_dir, "cache")


def load_or_build_latent_cache(
    dataset: ImageTextDataset, vae, accelerator, data: DataConfig, cache_dir: str, batch_size: int
) -> dict[str, torch.Tensor]:
    """The latent cache for this data and autoencoder: read from ``cache_dir``, or built there."""
    if not isinstance(dataset, ImageTextDataset):
        raise ValueError(
            "train.cache=true needs a map-style dataset (a streamed source cannot be cached); "
            "set data.streaming=false or train.cache=false"
        )
    path = os.path.join(cache_dir, f"latents-{cache_key(data, vae)}.safetensors")
    with accelerator.main_process_first():
        if accelerator.is_main_process and not os.path.isfile(path):
            tensors = encode_posteriors(dataset, vae, batch_size, accelerator.device)
            os.makedirs(cache_dir, exist_ok=True)
            partial = f"{path}.{os.getpid()}.tmp"  # per process: runs sharing a cache folder may build it at once
            save_file(tensors, partial)
            os.replace(partial, path)
        return load_file(path)


class CachedLatentDataset(torch.utils.data.Dataset):
    """Items ``{"latent_mean", "latent_std", "caption"}`` from a latent cache and its dataset's captions, and the
    item's scene ``"objects"`` when ``with_objects`` (:meth:`ImageTextDataset.scene_objects`)."""

    def __init__(self, cache: dict[str, torch.Tensor], dataset: ImageTextDataset, with_objects: bool = False):
        self.mean, self.std, self.index = cache["mean"], cache["std"], cache["index"]
        self.dataset = dataset
        self.with_objects = with_objects

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict[str, Any] | None:
        caption = self.dataset.caption(int(self.index[position]))
        if caption is None:
            return None
        item = {"latent_mean": self.mean[position], "latent_std": self.std[position], "caption": caption}
        if self.with_objects:
            item["objects"] = self.dataset.scene_objects(int(self.index[position]))
        return item


def collate_latents(examples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch :class:`CachedLatentDataset` items (same keys as ``collate_image_text`` plus the latents)."""
    kept = [example for example in examples if example is not None]
    return {
        "latent_mean": torch.stack([e["latent_mean"] for e in kept]) if kept else torch.empty(0),
        "latent_std": torch.stack([e["latent_std"] for e in kept]) if kept else torch.empty(0),
        "captions": [e["caption"] for e in kept],
        "num_skipped": len(examples) - len(kept),
        **({"objects": [e["objects"] for e in kept]} if kept and "objects" in kept[0] else {}),
    }


class TextEmbeddingCache:
    """Embeddings of a frozen text encoder, each distinct caption encoded once.

    :meth:`precompute` encodes a known list of captions up front (the trainer passes every caption of
    a map-style dataset), so that the training steps never run the text encoder; a caption not seen
    before is encoded when it first appears (streaming data). The embeddings kept are bounded by
    ``max_bytes`` (at Stable Diffusion 1.5's 77 x 768 in bfloat16, 2 GiB hold about 18,000
    captions); past the bound, new captions are encoded every time they appear.

    The embeddings stay on ``device``. Precomputed ones come from the same batches (captions sorted
    by text) in every run, so a resumed run uses the same values as an uninterrupted one.
    """

    def __init__(self, text_encoder, tokenizer, device, max_bytes: int = 2 * 2**30):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device
        self.max_bytes = max_bytes
        self.embeddings: dict[str, torch.Tensor] = {}
        self.bytes_per_caption: int | None = None
        """Size of one embedding (known after the first encoding)."""

    @property
    def nbytes(self) -> int:
        """Memory held by the kept embeddings."""
        return len(self.embeddings) * (self.bytes_per_caption or 0)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        from .encoding import tokenize

        hidden = self.text_encoder(tokenize(self.tokenizer, captions).to(self.device))[0]
        self.bytes_per_caption = hidden[0].numel() * hidden.element_size()
        return hidden

    def _keep(self, captions: list[str], hidden: torch.Tensor) -> bool:
        """Keep ``hidden`` (one row per caption) if it fits in ``max_bytes``; whether it was kept."""
        if self.nbytes + len(captions) * self.bytes_per_caption > self.max_bytes:
            return False
        self.embeddings.update(zip(captions, hidden))
        return True

    def precompute(self, captions: Sequence[str], batch_size: int, show_progress: bool = True) -> bool:
        """Encode every caption of ``captions`` not kept yet, ``batch_size`` at a time, with a progress bar.

        Returns whether all of them are now kept. When they do not fit in ``max_bytes``, nothing is
        encoded beyond the first caption (which measures an embedding's size) and the cache stays lazy.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        missing = sorted(set(captions) - self.embeddings.keys())
        if not missing:
            return True
        first = self._encode(missing[:1])
        if self.nbytes + len(missing) * self.bytes_per_caption > self.max_bytes:
            logger.info(
                "text-embedding cache: %d captions need %.2f GiB, more than max_bytes (%.2f GiB); "
                "each is encoded when first seen instead",
                len(missing), len(missing) * self.bytes_per_caption / 2**30, self.max_bytes / 2**30,
            )
            return False
        self._keep(missing[:1], first)
        for start in tqdm(range(1, len(missing), batch_size), desc="caching text embeddings", disable=not show_progress):
            batch = missing[start : start + batch_size]
            self._keep(batch, self._encode(batch))
        return True

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({caption for caption in captions if caption not in self.embeddings})
        if missing:
            hidden = self._encode(missing)
            if not self._keep(missing, hidden):  # the cache is full: use this batch's without keeping it
                fresh = dict(zip(missing, hidden))
                return torch.stack([self.embeddings.get(c, fresh.get(c)) for c in captions])
        return torch.stack([self.embeddings[caption] for caption in captions])
