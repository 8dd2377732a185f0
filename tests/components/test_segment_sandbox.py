"""Segmentation on the sandbox tokenizer: for 1,000 random completions built from catalog titles,
the fast path, the decoding path and the parse's character spans give the same rank of every token."""
import random

import pytest
import torch

from rankgrpo.models import load_tokenizer
from rankgrpo.parsing import parse_recommendations
from rankgrpo.sandbox import SandboxConfig, build_world
from rankgrpo.segment import decode_completion, fast_path_is_exact, ranks_from_spans, token_char_starts, token_ranks


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    cfg = SandboxConfig(n_films=300, n_train=100, n_validation=5, n_test=5, hidden_size=32, num_layers=1,
                        num_heads=2, num_kv_heads=1, intermediate_size=64)
    world = build_world(cfg, tmp_path_factory.mktemp("world"))
    return world, load_tokenizer(world.root / "base_model")


def random_completion(rng, films):
    lines = []
    for _ in range(rng.choice([rng.randint(1, 19), 20, 20, 20, rng.randint(21, 25)])):
        title, year = rng.choice(films)
        u = rng.random()
        if u < 0.06:
            lines.append("")                                  # blank line
        elif u < 0.12:
            lines.append(title)                               # no year: unparseable
        elif u < 0.18:
            lines.append(f"{rng.randint(1, 20)}. **{title} ({year})**")
        else:
            lines.append(f"{title} ({year})")
    text = "\n".join(lines)
    return text + "\n" if rng.random() < 0.1 else text


def test_fast_general_and_parse_spans_agree_on_sandbox_completions(sandbox):
    world, tok = sandbox
    assert fast_path_is_exact(tok)
    films = [(it.title, it.year) for it in world.catalog]
    rng = random.Random(7)
    rows, cut = [], 0
    for _ in range(1000):
        ids = tok.encode(random_completion(rng, films), add_special_tokens=False)
        if rng.random() < 0.15:
            ids, cut = ids[:rng.randint(1, len(ids))], cut + 1   # cut before <eos>
        else:
            ids = ids + [tok.eos_token_id]
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = True

    fast = token_ranks(ids, mask, tok, method="fast")
    assert torch.equal(fast, token_ranks(ids, mask, tok, method="general"))
    overflow = blank = 0
    for b, row in enumerate(rows):
        text, starts = token_char_starts(row, tok)
        assert text == decode_completion(row, tok)
        items = parse_recommendations(text)
        assert ranks_from_spans(items, starts) == fast[b, :len(row)].tolist()
        assert text.count("\n") == len(items) - 1
        overflow += len(items) > 20
        blank += any(not it.valid for it in items)
    assert overflow > 50 and blank > 300 and cut > 100  # the hard cases were covered
