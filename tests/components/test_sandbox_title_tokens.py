"""The sandbox tokenizer with ``title_tokens``: every catalog title one token, every year one
token, text still round-trips, and the code that works on token offsets (rank segmentation, the
line counter, the catalog constraint) sees the same lines as the parser."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from rankgrpo.catalog import load_catalog
from rankgrpo.parsing import parse_recommendations
from rankgrpo.sandbox import SandboxConfig, build_world
from rankgrpo.sandbox.model import IM_END, build_tokenizer
from rankgrpo.segment import fast_path_is_exact, token_ranks
from rankgrpo.stopping import ItemLineCounter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TITLES = ["Silent Haunting", "Silent Haunting 2", "Run", "Amélie's Sister", "Wedding", "Neighbors & Wedding"]
YEARS = [2002, 2007, 1987, 2022, 1999, 2001]
CORPUS = ["I have seen a film and a runaway train.\n", "Runaway Wedding planners (1999)\n"] * 20


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, vocab_size=400, titles=TITLES, years=YEARS)


def _pieces(tok, text):
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_a_list_line_is_three_tokens_and_the_longest_title_wins(tok):
    assert _pieces(tok, "Silent Haunting 2 (2007)\n") == ["Silent Haunting 2", " (2007)", "Ċ"]
    assert _pieces(tok, "Silent Haunting (2002)\n") == ["Silent Haunting", " (2002)", "Ċ"]
    assert _pieces(tok, "Neighbors & Wedding (2001)")[:2] == ["Neighbors & Wedding", " (2001)"]
    # a title named in a conversation is the same token as in a list
    ids = tok("I have seen Silent Haunting.", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("Silent Haunting") in ids


def test_titles_match_whole_words_only(tok):
    pieces = _pieces(tok, "a Runaway train, Weddings")
    assert "Run" not in pieces and "Wedding" not in pieces
    assert "Run" in _pieces(tok, "I liked Run.")


@pytest.mark.parametrize("text", [
    "Amélie's Sister (2022)\nSilent Haunting 2 (2007)\nNot A Title (1999)\nRun (1987)",
    "I have seen Wedding, Weddings and Silent Haunting 22 (1999) twice.\n",
    "  Run  (1987)\n\nRun(1987)\n",
])
def test_text_round_trips_and_offsets_are_exact(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text


def test_segmentation_and_line_counter_agree_with_the_parser(tok):
    completion = "Silent Haunting 2 (2007)\nRun (1987)\nAmélie's Sister (2022)"
    ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(IM_END)]
    assert fast_path_is_exact(tok)
    for method in ("fast", "general"):
        ranks = token_ranks(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), tok, method=method)
        assert ranks[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2], method
    assert len(parse_recommendations(completion)) == 3
    counter = ItemLineCounter.from_tokenizer(tok)
    state = counter.start(1, "cpu")
    for i in ids:
        state = counter.update(state, torch.tensor([i]))
    assert int(counter.closed(state)[0]) == 2  # the third line has no newline yet


def test_a_world_with_title_tokens_differs_only_in_its_tokenizer(tmp_path):
    small = SandboxConfig(n_films=200, n_train=20, n_validation=5, n_test=5, vocab_size=600, hidden_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                          max_position_embeddings=256)
    plain = build_world(small, tmp_path / "plain")
    named = build_world(dataclasses.replace(small, title_tokens=True), tmp_path / "named")
    for name in ("catalog.jsonl", "train.jsonl", "test.jsonl"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "named" / name).read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "named" / "base_model")  # survives save and reload
    catalog = load_catalog(tmp_path / "named" / "catalog.jsonl")
    lines = [f"{it.title} ({it.year})\n" for it in catalog]
    assert all(len(tok(line, add_special_tokens=False)["input_ids"]) == 3 for line in lines)
    assert len(tok) == len(AutoTokenizer.from_pretrained(tmp_path / "plain" / "base_model")) + len(
        {it.title for it in catalog}) + len({it.year for it in catalog})
    assert named.config.title_tokens and not plain.config.title_tokens
    build_world(dataclasses.replace(small, title_tokens=True), tmp_path / "again")  # deterministic
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / "named" / "base_model" / name).read_bytes() == (tmp_path / "again" / "base_model" / name).read_bytes()
