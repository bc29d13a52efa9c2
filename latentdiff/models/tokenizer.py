"""An offline CLIP tokenizer.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE (49,408 tokens, 77-token context).
Its vocabulary ships inside the ``open_clip_torch`` wheel (``bpe_simple_vocab_16e6.txt.gz``), so
the tokenizer can be built with no network access and no Hub download. ``clip_tokenizer()`` turns
that file into a regular ``transformers.CLIPTokenizer``; saved with ``save_pretrained`` it is a
normal ``tokenizer/`` folder that ``CLIPTokenizer.from_pretrained(folder)`` loads anywhere.
"""

from __future__ import annotations

import copy
import gzip
import html
from functools import lru_cache

from transformers import CLIPTokenizer

CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# OpenCLIP pads with id 0 (the token "!"), as does the Stable Diffusion 2 tokenizer.
PAD_TOKEN = "!"
# The first line of the BPE file is a header; CLIP uses the next 49152 - 256 - 2 merges.
NUM_MERGES = 49152 - 256 - 2


BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
"""The BPE merges file inside the ``open_clip`` package (what ``open_clip.tokenizer.default_bpe()`` returns)."""


def _open_clip_bpe_path() -> str:
    """The path of the BPE file shipped inside ``open_clip_torch``, found without importing ``open_clip``.

    Importing ``open_clip`` takes seconds and pulls in torchvision, timm and ftfy, none of which the
    tokenizer needs: only this data file is read. So the package is located with
    ``importlib.util.find_spec`` (which runs none of its code); only if the file is not where
    ``open_clip.tokenizer.default_bpe()`` has always put it is that function asked.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "clip_tokenizer() reads the BPE vocabulary shipped inside `open_clip_torch`; "
            "install it with `pip install open_clip_torch`."
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BPE_FILE_NAME)
        if os.path.isfile(path):
            return path
    from open_clip.tokenizer import default_bpe  # pragma: no cover - a future layout of the package

    return default_bpe()  # pragma: no cover


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte-to-printable-character table (Radford et al. 2019)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def clip_vocabulary(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """Return CLIP's ``(vocab, merges)`` built from the BPE merges file.

    The id layout is OpenAI CLIP's: 256 byte symbols, the same with the end-of-word marker
    ``</w>``, one token per merge, then the start and end tokens (ids 49406 and 49407).
    """
    with gzip.open(bpe_path or _open_clip_bpe_path()) as file:
        lines = file.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


@lru_cache(maxsize=4)
def _build_clip_tokenizer(bpe_path: str) -> CLIPTokenizer:
    vocab, merges = clip_vocabulary(bpe_path)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(merge.split()) for merge in merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=CONTEXT_LENGTH,
        # "!" is both the padding token and ordinary punctuation. Without this flag the tokenizer
        # would cut every "!" in a caption out as a special token ("wow!!" -> "wow", "!", "!"),
        # where CLIP's BPE has the single token "!!</w>". With the flag, special-token text in a
        # caption stays ordinary characters, so no caption can end itself early.
        split_special_tokens=True,
    )


def clip_tokenizer(bpe_path: str | None = None) -> CLIPTokenizer:
    """Build OpenAI CLIP's tokenizer offline, as a ``transformers.CLIPTokenizer``.

    Works with ``HF_HUB_OFFLINE=1``: nothing is downloaded. Padding uses OpenCLIP's pad id 0 (as
    Stable Diffusion 2 does), so ``tokenizer(text, padding="max_length", truncation=True)`` gives
    the ids of ``open_clip.tokenize(text)``. OpenCLIP first rewrites text with ftfy and HTML
    unescaping (``&amp;`` -> ``&``, curly quotes -> straight, full-width -> ASCII); apply
    :func:`clean_caption` to such text first to get its ids exactly.

    The first call in a process takes a few seconds (the BPE merges are compiled); later calls
    return a copy of the cached tokenizer.
    """
    return copy.deepcopy(_build_clip_tokenizer(bpe_path or _open_clip_bpe_path()))


def clean_caption(text: str) -> str:
    """OpenCLIP's caption clean-up: ftfy repair, HTML unescaping, whitespace folding."""
    import ftfy  # a dependency of open_clip_torch

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())
