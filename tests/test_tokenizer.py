"""The offline CLIP tokenizer gives OpenCLIP's token ids, and saves as a normal tokenizer folder."""

from __future__ import annotations

import os

import open_clip
import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from latentdiff.models.tokenizer import CONTEXT_LENGTH, clean_caption, clip_tokenizer

BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0

LONG_CAPTION = " ".join(f"object{number} is a small red circle next to a blue square," for number in range(40))

CAPTIONS = [
    # plain, mixed case
    "a red circle at the top left",
    "A Red Circle At The Top Left",
    "TWO GREEN TRIANGLES",
    "a photo of a CaT wearing a HaT",
    "camelCaseWords and snake_case_words",
    # punctuation
    "wow!!",
    "wow!! really?!",
    "what?!?!",
    "!",
    "!!!",
    "red, green, and blue",
    "a cat's hat, the dogs' bowl",
    "don't stop; it's fine: we'll see",
    'she said "hello" to the "world"',
    "'single quoted' words",
    "a well-known, high-quality image",
    "black/white and either/or",
    "a circle (small) and a square [large] {maybe}",
    "ellipsis... and -- dashes",
    "#hashtag @mention $5 100% a&b a+b=c",
    "path/to/file.png and http://example.com/a?b=c",
    # numbers and decimals
    "3 red circles",
    "3.14159 and 2.5x zoom",
    "1,000,000 stars in 2024",
    "24mm f/1.4 lens, ISO 100",
    "1st 2nd 3rd 4th",
    # whitespace
    "  leading and trailing spaces  ",
    "many     spaces   between",
    "tabs\tbetween\twords",
    "new\nlines\r\nand\n\nblank lines",
    " \t\n ",
    # accents and other scripts
    "café crème brûlée",
    "naïve Zoë façade",
    "Ångström Øresund straße",
    "東京タワーの夜景",
    "一只红色的猫",
    "한국어 문장",
    "Привет, мир",
    "مرحبا بالعالم",
    "ελληνικά γράμματα",
    # emoji
    "a cat 🐱 and a dog 🐶",
    "🔥🔥🔥",
    "thumbs up 👍🏽 and a family 👨‍👩‍👧",
    "flag 🇯🇵 and a heart ❤️",
    # empty and edge cases
    "",
    "a",
    "<|startoftext|> and <|endoftext|> as text",
    "ab" * 200,
    # truncated to the context
    LONG_CAPTION,
    "word " * 100,
]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    """OpenCLIP's own BPE tokenizer (what ``open_clip.tokenize`` uses)."""
    return open_clip.tokenizer.SimpleTokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, padding="max_length", truncation=True, max_length=CONTEXT_LENGTH).input_ids


def _open_clip_ids(text: str) -> list[int]:
    return open_clip.tokenize([text])[0].tolist()


def test_runs_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_captions_are_varied_and_include_truncation(open_clip_tokenizer):
    assert len(CAPTIONS) == 50 and len(set(CAPTIONS)) == 50
    # Some captions really are longer than the context, so truncation is exercised.
    assert sum(len(open_clip_tokenizer.encode(text)) > CONTEXT_LENGTH - 2 for text in CAPTIONS) >= 3


@pytest.mark.parametrize("text", CAPTIONS)
def test_ids_match_open_clip(tokenizer, text):
    ids = _ids(tokenizer, text)
    assert ids == _open_clip_ids(text)
    assert len(ids) == CONTEXT_LENGTH and ids[0] == BOS_ID


@pytest.mark.parametrize("text", [LONG_CAPTION, "word " * 100, "ab" * 200])
def test_long_text_is_truncated_with_end_of_text_last(tokenizer, text):
    ids = _ids(tokenizer, text)
    assert len(ids) == CONTEXT_LENGTH
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert PAD_ID not in ids


def test_padding_uses_id_0_after_end_of_text(tokenizer):
    ids = _ids(tokenizer, "a red circle")
    end = ids.index(EOS_ID)
    assert ids[end + 1 :] == [PAD_ID] * (CONTEXT_LENGTH - end - 1)
    assert tokenizer("a red circle", padding="max_length").input_ids == ids  # max_length defaults to 77


@pytest.mark.parametrize(
    "text",
    [
        "salt &amp; pepper",
        "fish &amp;amp; chips",  # double-escaped: OpenCLIP unescapes twice
        "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apostrophe&#39;",
        "\u201ccurly double\u201d and \u2018curly single\u2019 quotes",
        "ＡＢＣ ｆｕｌｌ－ｗｉｄｔｈ １２３",  # full-width letters, hyphen and digits
        "mojibake: cafÃ© and donâ€™t",
        "ligatures: \ufb01ne \ufb02ow",
        "  A&amp;B\t\u201cquoted\u201d  \uff21\uff22\uff23  ",
    ],
)
def test_clean_caption_then_tokenizer_matches_open_clip(tokenizer, text):
    expected = _open_clip_ids(text)
    assert _ids(tokenizer, clean_caption(text)) == expected
    # OpenCLIP repairs such text itself (ftfy, HTML unescaping); the tokenizer alone does not.
    assert _ids(tokenizer, text) != expected


def test_clean_caption():
    assert clean_caption("  salt &amp;amp;\t pepper\n") == "salt & pepper"
    assert clean_caption("\u201cquoted\u201d \uff21\uff22\uff23") == '"quoted" ABC'


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded_clip = CLIPTokenizer.from_pretrained(tmp_path)
    reloaded_auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["wow!! really?!", "a red circle at the top left", "", LONG_CAPTION, "café 東京 🐱"]:
        expected = _open_clip_ids(text)
        assert _ids(tokenizer, text) == expected
        assert _ids(reloaded_clip, text) == expected, f"CLIPTokenizer.from_pretrained differs on {text!r}"
        assert _ids(reloaded_auto, text) == expected, f"AutoTokenizer.from_pretrained differs on {text!r}"
    for reloaded in (reloaded_clip, reloaded_auto):
        assert reloaded.model_max_length == CONTEXT_LENGTH
        assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
        assert len(reloaded) == 49408


def test_vocabulary(tokenizer, open_clip_tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.vocab_size == 49408
    assert tokenizer.bos_token_id == BOS_ID and tokenizer.convert_ids_to_tokens(BOS_ID) == "<|startoftext|>"
    assert tokenizer.eos_token_id == EOS_ID and tokenizer.convert_ids_to_tokens(EOS_ID) == "<|endoftext|>"
    assert tokenizer.pad_token_id == PAD_ID
    assert tokenizer.model_max_length == CONTEXT_LENGTH
    # The ids agree with OpenCLIP's own vocabulary token by token. Only the two special tokens are
    # spelled differently: OpenCLIP 3 calls them <start_of_text> / <end_of_text>, the Hugging Face
    # CLIP tokenizers (and Stable Diffusion's tokenizer folders) <|startoftext|> / <|endoftext|>.
    open_clip_vocab = dict(open_clip_tokenizer.encoder)
    specials = {open_clip_vocab.pop(token, None) for token in ("<start_of_text>", "<end_of_text>")}
    assert specials == {BOS_ID, EOS_ID}
    vocab = tokenizer.get_vocab()
    assert (vocab.pop("<|startoftext|>"), vocab.pop("<|endoftext|>")) == (BOS_ID, EOS_ID)
    assert vocab == open_clip_vocab


@pytest.mark.parametrize("text", ["a <end_of_text> b", "a <|endoftext|> b", "<|startoftext|>x"])
def test_special_token_text_in_a_caption_is_plain_text(tokenizer, text):
    """Text spelling a special token never becomes one: a caption cannot end itself early.

    (OpenCLIP 3 does map the literal text ``<end_of_text>`` to its end-of-text id; this tokenizer
    keeps any such text as ordinary characters, because it is built with ``split_special_tokens``.)
    """
    ids = tokenizer(text).input_ids
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert BOS_ID not in ids[1:-1] and EOS_ID not in ids[1:-1]


def test_clip_tokenizer_returns_independent_copies():
    first, second = clip_tokenizer(), clip_tokenizer()
    first.add_tokens(["<new-token>"])
    assert len(second) == 49408 and len(first) == 49409
