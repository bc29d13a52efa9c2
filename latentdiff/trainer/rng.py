"""The training random generator and the random choices of a step drawn from it (caption dropout, crops)."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file


class TrainingRNG:
    """The one random generator of a training process: noise, timesteps, latent samples, caption dropout.

    A dedicated generator, not torch's global one, because code outside the loop draws from the global
    generator at moments that differ between an uninterrupted run and a resumed one (creating a
    DataLoader iterator draws a worker seed from it, for instance). Each process seeds its own
    (``seed + process index``) and its state is saved with every checkpoint, one file per process.
    """

    def __init__(self, seed: int, accelerator: Accelerator):
        self.process_index = accelerator.process_index
        self.generator = torch.Generator(device=accelerator.device).manual_seed(seed + self.process_index)

    def file_name(self) -> str:
        return f"training_rng_{self.process_index}.safetensors"

    def save(self, folder: str) -> None:
        save_file({"state": self.generator.get_state()}, os.path.join(folder, self.file_name()))

    def load(self, folder: str) -> None:
        path = os.path.join(folder, self.file_name())
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {folder!r} has no random-generator state for process {self.process_index} ({path}); "
                "was it written by a run with fewer processes (resume with the same number) or by an older latentdiff?"
            )
        self.generator.set_state(load_file(path)["state"])


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by ``""`` with ``probability``, for classifier-free guidance.

    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1: the unconditional model is the
    same network trained on the empty prompt ``p_uncond`` of the time.
    """
    if probability <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist())]



def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image of a batch ``(N, C, H, W)``."""
    batch, _, height, width = images.shape
    top = torch.randint(0, height - size + 1, (batch,), generator=generator, device=generator.device).tolist()
    left = torch.randint(0, width - size + 1, (batch,), generator=generator, device=generator.device).tolist()
    return torch.stack([image[:, y : y + size, x : x + size] for image, y, x in zip(images, top, left)])
