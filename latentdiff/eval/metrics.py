"""Image-quality metrics: FID and CLIP score as the wider ecosystem computes them, and the offline
shapes Frechet distance (SFD).

=========================  ====================================================================================
metric                     how
=========================  ====================================================================================
:func:`fid`                Frechet distance of Inception-v3 pool features (2048-d), the extractor of
                           ``torchmetrics`` / ``torch-fidelity`` with the standard FID weights read from a local
                           file; install ``pip install "torchmetrics[image]" torch-fidelity`` (the ``fid`` extra)
:func:`clip_score`         ``100 * max(cos(image, text), 0)`` averaged over pairs, as ``torchmetrics``'
                           ``CLIPScore``, with an ``open_clip`` model loaded from a local checkpoint
:func:`shapes_frechet_distance`
                           the shapes Frechet distance (SFD): Frechet distance of the features of the project's
                           own shapes encoder (:mod:`latentdiff.eval.encoder`), trained on the shapes data. It
                           needs no download; it is **not** FID and its values are not comparable with FID's
=========================  ====================================================================================

FID and SFD share :func:`frechet_distance`.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureStatistics",
    "clip_score",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "inception_features",
    "shapes_frechet_distance",
    "shapes_reference_set",
    "shapes_reference_statistics",
]

#: The standard FID Inception weights (TensorFlow's 2015-12-05 Inception-v3 converted to PyTorch), as
#: ``torch-fidelity`` and ``torchmetrics`` download them; here they are read from a local file.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_FID_INSTALL = 'pip install "torchmetrics[image]" torch-fidelity   (or: pip install "latentdiff[fid]")'

#: Reference set of the shapes Frechet distance: renders of ``make_shapes_dataset(num, seed=...)``.
#: (The shapes encoder trained on data seeds 1000 and 1001, so the reference is neither.)
SFD_REFERENCE_SEED = 12345
SFD_REFERENCE_SIZE = 1000


# --------------------------------------------------------------------------------------------
# The Frechet distance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a set of feature vectors, and how many there were."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


def feature_statistics(features: np.ndarray) -> FeatureStatistics:
    """Mean and unbiased covariance (``N - 1``) of ``N x D`` features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need an N x D array of features with N >= 2, got shape {features.shape}")
    return FeatureStatistics(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    r"""Frechet (2-Wasserstein) distance between two Gaussians, squared, as FID uses it.

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", Sec. 3 (after Dowson & Landau 1982):

    .. math::
        d^2 = \|\mu_1 - \mu_2\|_2^2 + \operatorname{Tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big)

    The matrix square root is ``scipy.linalg.sqrtm`` (as in the reference implementations). When the
    product is singular (fewer samples than dimensions, constant features), ``eps`` is added to both
    diagonals first, as ``pytorch-fid`` does; a tiny imaginary part from rounding is dropped, a large
    one is warned about.
    """
    from scipy import linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(mu, dtype=np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, dtype=np.float64)) for sigma in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance needs two means of shape (D,) and two covariances of shape (D, D); got means "
            f"{mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )
    difference = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covariance_root = linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(warning.category, linalg.LinAlgWarning) for warning in caught)
    if singular or not np.isfinite(covariance_root).all():
        # fewer samples than dimensions (or constant features): regularize, as pytorch-fid does
        offset = np.eye(dim) * eps
        covariance_root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covariance_root):
        imaginary = np.abs(np.diagonal(covariance_root).imag).max()
        scale = max(1.0, float(np.abs(np.diagonal(covariance_root).real).max()))
        if imaginary > 1e-3 * scale:
            warnings.warn(
                f"frechet_distance: the covariance product's square root has an imaginary part of {imaginary:.3g}; "
                "the covariances are probably estimated from too few samples for their dimension",
                RuntimeWarning,
                stacklevel=2,
            )
        covariance_root = covariance_root.real
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covariance_root)
    return float(max(distance, 0.0))


def _frechet_between(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    return frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance)


# --------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------


def _pil_images(images: Sequence[Any], name: str, minimum: int = 2) -> list[Image.Image]:
    """PIL images (RGB) from PIL images or HxWx3 arrays (uint8, or floats in 0..1); at least ``minimum``."""
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor, str)):
        raise TypeError(f"{name} must be a sequence of images (a list of PIL images or HxWx3 arrays), "
                        f"got a single {type(images).__name__}")
    converted = []
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            converted.append(image.convert("RGB"))
        elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
            array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            converted.append(Image.fromarray(array))
        else:
            raise TypeError(f"{name}[{index}] is a {type(image).__name__}; expected a PIL image or an HxWx3 array")
    if len(converted) < minimum:
        raise ValueError(f"{name} holds {len(converted)} image(s); at least {minimum} needed")
    return converted


def _uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """``B x 3 x H x W`` uint8 (images of one batch must share a size)."""
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one batch must share a size; got sizes {sorted(sizes)}")
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images])).permute(0, 3, 1, 2)


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


def _check_inception_weights(inception_weights: str | os.PathLike[str] | None) -> str:
    where = (
        f"download {INCEPTION_WEIGHTS_URL} (on a machine with internet access) and pass its local path, "
        f"e.g. ~/.cache/latentdiff/{INCEPTION_WEIGHTS_FILE}"
    )
    if inception_weights is None:
        raise FileNotFoundError(f"FID needs the Inception-v3 FID weights as a local file: {where}")
    path = os.path.expanduser(os.fspath(inception_weights))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception weights file at {path!r}; {where}")
    # torch-fidelity unpickles the file with weights_only=False; open it safely first, so that a file
    # holding anything but tensors is refused here instead of being executed there.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise ValueError(
            f"{path!r} is not a plain PyTorch state dict of tensors ({type(error).__name__}: {error}); expected "
            f"the FID Inception weights {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
        ) from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(
            f"{path!r} does not hold the FID Inception-v3 weights (no 'Conv2d_1a_3x3.conv.weight'); expected "
            f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
        )
    return path


def _import_torchmetrics_fid() -> Any:
    missing = []
    for module in ("torchmetrics", "torch_fidelity"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module.replace("_", "-"))
    if missing:
        raise ImportError(f"FID needs {' and '.join(missing)} (not installed): {_FID_INSTALL}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance


_INCEPTION_FEATURE_DIMS = (64, 192, 768, 2048)


@functools.lru_cache(maxsize=2)
def _inception_extractor(path: str, feature_dim: int, device: str) -> torch.nn.Module:
    FrechetInceptionDistance = _import_torchmetrics_fid()
    # torchmetrics builds torch-fidelity's FID Inception (pool features, images resized to 299 px
    # inside) from the local weights; its `inception` module is the feature extractor.
    metric = FrechetInceptionDistance(feature=feature_dim, feature_extractor_weights_path=path, normalize=False)
    return metric.inception.to(device).eval()


def _check_feature_dim(feature_dim: int) -> None:
    if feature_dim not in _INCEPTION_FEATURE_DIMS:
        raise ValueError(
            f"feature_dim must be one of {_INCEPTION_FEATURE_DIMS} (Inception-v3 layers), got {feature_dim!r}; "
            "FID is defined on 2048"
        )


@torch.no_grad()
def inception_features(
    images: Sequence[Any],
    inception_weights: str | os.PathLike[str],
    batch_size: int = 50,
    device: str | torch.device | None = None,
    feature_dim: int = 2048,
) -> np.ndarray:
    """Inception-v3 pool features (``N x feature_dim``) of images of any size (resized to 299 px by the extractor)."""
    _check_feature_dim(feature_dim)
    pil_images = _pil_images(images, "images")
    path = _check_inception_weights(inception_weights)
    extractor = _inception_extractor(path, feature_dim, str(_default_device(device)))
    device = next(extractor.parameters()).device
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(pil_images), batch_size), desc="inception", leave=False):
        batch = _uint8_batch(pil_images[start : start + batch_size]).to(device)
        chunks.append(extractor(batch).double().cpu().numpy())
    return np.concatenate(chunks)


def fid(
    real_images: Sequence[Any],
    fake_images: Sequence[Any],
    inception_weights: str | os.PathLike[str],
    batch_size: int = 50,
    device: str | torch.device | None = None,
    feature_dim: int = 2048,
) -> float:
    """Frechet Inception Distance (Heusel et al. 2017) between two sets of images.

    Features are the 2048-d pool features of the FID Inception-v3 as ``torchmetrics``' (and
    ``torch-fidelity``'s) ``FrechetInceptionDistance`` computes them, from the weights file
    ``inception_weights`` (:data:`INCEPTION_WEIGHTS_FILE`, downloadable from
    :data:`INCEPTION_WEIGHTS_URL`); the distance is :func:`frechet_distance`. FID depends on the
    number of images (it is biased upwards for small sets): compare FIDs over equally many images,
    in the thousands for published figures. ``feature_dim`` picks an earlier Inception layer (64,
    192, 768) as torchmetrics allows; FID proper is 2048.

    Raises:
        FileNotFoundError: no weights file at ``inception_weights`` (the message says where to get it).
        ImportError: ``torchmetrics`` or ``torch-fidelity`` is not installed (the message says how).
        ValueError: fewer than 2 images on a side, or the file is not the FID Inception weights.
    """
    _check_feature_dim(feature_dim)
    real = _pil_images(real_images, "real_images")
    fake = _pil_images(fake_images, "fake_images")
    path = _check_inception_weights(inception_weights)
    _import_torchmetrics_fid()
    real_stats = feature_statistics(inception_features(real, path, batch_size, device, feature_dim))
    fake_stats = feature_statistics(inception_features(fake, path, batch_size, device, feature_dim))
    return _frechet_between(real_stats, fake_stats)


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _open_clip_model(model_name: str | None, weights_path: str, device: str) -> tuple[Any, Any, Any]:
    import open_clip

    if os.path.isdir(weights_path):
        # open_clip's local folder layout: open_clip_config.json (architecture) + the weights file
        if not os.path.isfile(os.path.join(weights_path, "open_clip_config.json")):
            raise FileNotFoundError(
                f"{weights_path!r} is a folder without open_clip_config.json; pass a checkpoint file together "
                "with its architecture's model_name, or a folder in open_clip's local layout "
                "(open_clip_config.json + open_clip_model.safetensors)"
            )
        identifier = f"local-dir:{weights_path}"
        model, _, preprocess = open_clip.create_model_and_transforms(identifier, device=device)
        tokenizer = open_clip.get_tokenizer(identifier)
    else:
        if not model_name:
            raise ValueError(
                f"clip_score: with a checkpoint file ({weights_path!r}) pass model_name, the open_clip architecture "
                "it belongs to (e.g. 'ViT-B-32')"
            )
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip architecture {model_name!r}; known ones include "
                f"{', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models())"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights_path, device=device
            )
        except RuntimeError as error:  # load_state_dict: missing / unexpected keys, size mismatches
            raise ValueError(
                f"{weights_path!r} does not hold weights of the open_clip architecture {model_name!r}: "
                f"{str(error).splitlines()[0]}"
            ) from None
        tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    return model, preprocess, tokenizer


@torch.no_grad()
def clip_score(
    images: Sequence[Any],
    prompts: Sequence[str],
    model_name: str | None,
    weights_path: str | os.PathLike[str],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float:
    """CLIP score (Hessel et al. 2021, "CLIPScore", Sec. 3, with torchmetrics' scale): the mean over
    image-prompt pairs of ``100 * max(cos(E_image, E_text), 0)``, from an ``open_clip`` model.

    Args:
        images: PIL images or HxWx3 arrays, one per prompt.
        prompts: the prompt of each image.
        model_name: the open_clip architecture of ``weights_path`` when that is a checkpoint file (e.g.
            ``"ViT-B-32"``); ignored for a folder.
        weights_path: a local checkpoint file (``.safetensors``, or a ``.bin``/``.pt`` state dict as
            open_clip releases them), or a folder in open_clip's local layout (``open_clip_config.json``
            and ``open_clip_model.safetensors``). Nothing is downloaded.

    Raises:
        FileNotFoundError: nothing at ``weights_path``.
        ValueError: images and prompts differ in number, or the architecture is unknown.
    """
    pil_images = _pil_images(images, "images", minimum=1)
    if isinstance(prompts, str) or len(prompts) != len(pil_images):
        raise ValueError(
            f"clip_score needs one prompt per image: got {len(pil_images)} images and "
            f"{'a single string' if isinstance(prompts, str) else f'{len(prompts)} prompts'}"
        )
    if weights_path is None or not os.path.exists(os.path.expanduser(os.fspath(weights_path))):
        raise FileNotFoundError(
            f"no open_clip weights at {weights_path!r}: CLIP score needs a local checkpoint (a file, with the "
            "model_name of its architecture, or an open_clip folder with open_clip_config.json); download one on "
            "a machine with internet access, e.g. open_clip_model.safetensors of a laion/CLIP-ViT-B-32 repository"
        )
    path = os.path.abspath(os.path.expanduser(os.fspath(weights_path)))
    device = _default_device(device)
    model, preprocess, tokenizer = _open_clip_model(model_name, path, str(device))
    scores = []
    for start in range(0, len(pil_images), batch_size):
        pixels = torch.stack([preprocess(image) for image in pil_images[start : start + batch_size]]).to(device)
        tokens = tokenizer(list(prompts[start : start + batch_size])).to(device)
        image_embeddings = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
        text_embeddings = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        scores.append(100 * (image_embeddings * text_embeddings).sum(-1).clamp(min=0))
    return float(torch.cat(scores).mean())


# --------------------------------------------------------------------------------------------
# The shapes Frechet distance (SFD)
# --------------------------------------------------------------------------------------------


def shapes_reference_set(
    num_images: int = SFD_REFERENCE_SIZE,
    seed: int = SFD_REFERENCE_SEED,
    image_size: int = 64,
    holdout: Sequence[str] = (),
) -> tuple[list[Image.Image], list[str]]:
    """The real side of SFD: renders of ``make_shapes_dataset(num_images, seed, holdout=holdout)``, and
    each render's caption (its ``text``), the prompts to generate the other side from (as FID on COCO
    generates from the captions of its reference images)."""
    from ..data.shapes import make_shapes_dataset

    dataset = make_shapes_dataset(num_images, seed=seed, image_size=image_size, holdout=tuple(holdout))
    return list(dataset["image"]), list(dataset["text"])


@functools.lru_cache(maxsize=4)
def _reference_statistics(
    num_images: int, seed: int, holdout: tuple[str, ...], encoder_path: str | None
) -> FeatureStatistics:
    from .encoder import encode_images, load_shapes_encoder

    images, _ = shapes_reference_set(num_images, seed, holdout=holdout)
    return feature_statistics(encode_images(images, load_shapes_encoder(encoder_path)))


def shapes_reference_statistics(
    num_images: int = SFD_REFERENCE_SIZE,
    seed: int = SFD_REFERENCE_SEED,
    holdout: Sequence[str] = (),
    encoder_path: str | None = None,
) -> FeatureStatistics:
    """Encoder-feature statistics of :func:`shapes_reference_set`'s images (computed once per process)."""
    return _reference_statistics(num_images, seed, tuple(holdout), encoder_path)


def shapes_frechet_distance(
    real: Sequence[Any] | FeatureStatistics | None,
    fake: Sequence[Any] | FeatureStatistics,
    encoder_path: str | os.PathLike[str] | None = None,
) -> float:
    """Shapes Frechet distance (SFD): :func:`frechet_distance` between the features of the project's
    shapes encoder (:mod:`latentdiff.eval.encoder`) on two sets of images.

    ``real`` and ``fake`` are sequences of images (PIL or HxWx3 arrays, any size: resized to 64 px)
    or precomputed :class:`FeatureStatistics`; ``real=None`` uses :func:`shapes_reference_statistics`
    (1,000 renders of the shapes data). Only for the shapes domain, and **not FID**: the encoder was
    trained on renders of this data, so SFD ranks models and samplers of this domain, nothing more.
    Like FID it is biased upwards for small sets (two independent sets of 1,000 renders: about 50;
    of 200: about 130), so compare values over equally many images. To measure a model, generate
    from the captions of the reference set (:func:`shapes_reference_set`), so that both sides
    describe the same scenes.
    """
    from .encoder import encode_images, load_shapes_encoder

    path = os.fspath(encoder_path) if encoder_path is not None else None

    def statistics(images: Any, name: str) -> FeatureStatistics:
        if isinstance(images, FeatureStatistics):
            return images
        return feature_statistics(encode_images(_pil_images(images, name), load_shapes_encoder(path)))

    fake_stats = statistics(fake, "fake")
    real_stats = shapes_reference_statistics(encoder_path=path) if real is None else statistics(real, "real")
    return _frechet_between(real_stats, fake_stats)
