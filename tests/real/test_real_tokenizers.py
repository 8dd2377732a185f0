"""Real tokenizers (Qwen2, Llama-3, SmolLM2): the converted directories tokenise as the originals,
and token -> rank segmentation is exact on the authors' completions and on flawed variants.

The segmentation reference here is independent of the tokenizer's decoder: each token's bytes
come from the byte-level alphabet of its vocabulary entry (GPT-2's bytes_to_unicode), its
first character from UTF-8 byte accounting, and its rank from `parse_recommendations` spans.
"""
from __future__ import annotations

import random

import pytest
import torch

from rankgrpo.models import load_tokenizer
from rankgrpo.parsing import parse_recommendations
from rankgrpo.segment import decode_completion, fast_path_is_exact, ranks_from_spans, token_ranks

from conftest import TOKENIZER_DIRS, asset

pytestmark = pytest.mark.real

REFERENCE = {"qwen2": "ggml-vocab-qwen2.gguf", "llama3": "ggml-vocab-llama-bpe.gguf"}


@pytest.fixture(scope="module", params=sorted(TOKENIZER_DIRS))
def named_tokenizer(request):
    return request.param, load_tokenizer(asset(TOKENIZER_DIRS[request.param]))


def gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to
    U+0100 onwards in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


BYTE_DECODER = gpt2_byte_decoder()


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    special = set(tokenizer.all_special_ids)
    return [b"" if i in special else bytes(BYTE_DECODER[c] for c in tokenizer.convert_ids_to_tokens(i))
            for i in ids]


def expected_ranks(tokenizer, ids: list[int]) -> list[int]:
    pieces = token_bytes(tokenizer, ids)
    data = b"".join(pieces)
    text = data.decode("utf-8", errors="replace")
    assert text == decode_completion(ids, tokenizer)
    starts, offset = [], 0
    for piece in pieces:
        starts.append(len(data[:offset].decode("utf-8", errors="ignore")))
        offset += len(piece)
    return ranks_from_spans(parse_recommendations(text), starts)


def flawed_variants(completion: str, rng: random.Random) -> list[str]:
    """What real models write around a list: numbering, double spacing, bold, a preamble,
    lower case, a trailing explanation, no final newline, and cuts anywhere."""
    lines = completion.strip("\n").split("\n")
    return [
        completion,
        "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1)),
        "\n\n".join(lines) + "\n",
        "\n".join(f"- **{line}**" for line in lines),
        "Here are 20 movies you might enjoy:\n\n" + "\n".join(lines).lower(),
        "\n".join(lines) + "\n\nThese films share the tone you described.",
        "\r\n".join(lines),
        completion[: rng.randint(1, len(completion))],
    ]


def padded(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
    return ids, mask


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_tokenizer_directory_reproduces_the_reference_tokenization(name):
    """llama.cpp ships, next to each vocabulary, strings and the ids the original Hugging Face
    tokenizer gives them; the saved directory must give the same ids."""
    directory = asset(TOKENIZER_DIRS[name])
    tokenizer = load_tokenizer(directory)
    vocab = REFERENCE[name]
    texts = (directory / "reference" / f"{vocab}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = (directory / "reference" / f"{vocab}.out").read_text(encoding="utf-8").split("\n")
    if texts[-1] == "":
        texts.pop()
    assert len(texts) >= 40
    for text, line in zip(texts, lines):
        assert tokenizer.encode(text, add_special_tokens=False) == [int(x) for x in line.split()], repr(text)


def test_segmentation_is_exact_on_real_completions(named_tokenizer, reddit_examples):
    """Every authors' completion, and 7 flawed variants of every 4th, most with an end-of-text
    token: the fast path, the general path (which decodes every prefix, O(T^2)) and the
    byte-accounting reference agree token by token."""
    name, tokenizer = named_tokenizer
    assert fast_path_is_exact(tokenizer), name
    rng = random.Random(0)
    texts = [ex.completion for ex in reddit_examples]
    texts += [v for ex in reddit_examples[::4] for v in flawed_variants(ex.completion, rng)[1:]]
    rows = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        rows.append(ids + [tokenizer.eos_token_id] if rng.random() < 0.8 else ids)
    ids, mask = padded(rows, tokenizer.eos_token_id)  # pad == eos: masks come from lengths
    fast = token_ranks(ids, mask, tokenizer, method="fast")
    general = token_ranks(ids, mask, tokenizer, method="general")
    assert torch.equal(fast, general)
    assert torch.equal(token_ranks(ids, mask, tokenizer), fast)
    for b, row in enumerate(rows):
        assert fast[b][mask[b]].tolist() == expected_ranks(tokenizer, row), (name, b)
    # the authors' lists have 20 lines: ranks 0..19
    assert all(int(fast[b][mask[b]].max()) == 19 for b in range(len(reddit_examples)))
