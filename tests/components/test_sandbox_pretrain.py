"""Knowledge pretraining of the sandbox base model: deterministic, cached with the world, rebuilt
on a config mismatch, blind to the splits, and it teaches the model the world's facts."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from rankgrpo.sandbox import SandboxConfig, build_world, ensure_world, load_world
from rankgrpo.sandbox.model import build_base_model
from rankgrpo.sandbox.pretrain import catalog_lists, knowledge_corpus, lm_loss, pack
from rankgrpo.sandbox.world import World, conversation_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = SandboxConfig(n_films=200, n_train=40, n_validation=10, n_test=10, vocab_size=768, hidden_size=48,
                     num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=96, max_position_embeddings=256,
                     pretrain_steps=40, pretrain_lr=1e-2, pretrain_batch_size=8, pretrain_seq_len=64,
                     pretrain_fact_renderings=2, pretrain_co_preference=400)
CORPUS = dict(fact_renderings=2, co_preference_sentences=400)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "world"
    build_world(TINY, out)
    return out


def _weights(path):
    return (path / "base_model" / "model.safetensors").read_bytes()


def test_pretraining_is_deterministic_and_changes_the_weights(world_dir, tmp_path):
    again = tmp_path / "again"
    build_world(TINY, again)
    assert _weights(world_dir) == _weights(again)
    random_base = tmp_path / "random"
    build_world(dataclasses.replace(TINY, pretrain_steps=0), random_base)
    assert _weights(world_dir) != _weights(random_base)
    assert not (random_base / "base_model" / "pretrain.json").exists()
    record = json.loads((world_dir / "base_model" / "pretrain.json").read_text())
    assert record["steps"] == 40 and record["tokens_seen"] == 40 * 8 * 64
    assert record["last_loss"] < record["first_loss"]
    # the data files do not depend on pretraining
    for name in ("catalog.jsonl", "train.jsonl", "test.jsonl", "base_model/tokenizer.json"):
        assert (world_dir / name).read_bytes() == (random_base / name).read_bytes()


def test_ensure_world_reuses_a_pretrained_world_and_rebuilds_on_a_mismatch(world_dir, tmp_path, monkeypatch):
    import shutil

    import rankgrpo.sandbox.build as build

    cached = tmp_path / "cached"
    shutil.copytree(world_dir, cached)
    calls = []
    real = build.build_world
    monkeypatch.setattr(build, "build_world", lambda *a, **k: calls.append(a) or real(*a, **k))
    ensure_world(cached, TINY, verbose=False)
    assert calls == []  # same config and code: loaded, not rebuilt
    ensure_world(cached, dataclasses.replace(TINY, pretrain_steps=10), verbose=False)
    assert len(calls) == 1
    assert json.loads((cached / "base_model" / "pretrain.json").read_text())["steps"] == 10
    manifest = json.loads((cached / "hidden" / "world.json").read_text())
    assert manifest["config"]["pretrain_steps"] == 10 and manifest["counts"]["pretrain_tokens"] == 10 * 8 * 64


def test_corpus_is_deterministic_and_reads_nothing_of_the_splits(world_dir):
    world = load_world(world_dir)
    corpus = knowledge_corpus(world, **CORPUS)
    assert corpus == knowledge_corpus(world, **CORPUS)
    assert corpus != knowledge_corpus(world, **CORPUS, seed=1)
    # the same catalog without any conversation (no tastes, no splits) gives the same text
    blind = World(world.config, world.catalog)
    assert knowledge_corpus(blind, **CORPUS) == corpus
    assert len(corpus) == 2 * 200 + 400


def test_corpus_holds_no_conversation_and_no_recommendation_list(world_dir):
    world = load_world(world_dir)
    text = "\n\n".join(knowledge_corpus(world, **CORPUS))
    assert "USER:" not in text and "SYSTEM:" not in text
    assert all("\n" not in doc for doc in knowledge_corpus(world, **CORPUS))  # prose, never one title a line
    n = 0
    for split in ("train", "validation", "test"):
        for ex in world.examples(split):
            conversation = conversation_of(ex.prompt_text).strip()
            assert conversation not in text
            for sentence in conversation.replace("USER: ", "").split(". "):
                # every sentence a user writes that is more than a film's name
                if len(sentence) > 60:
                    assert sentence not in text, sentence
                    n += 1
    assert n > 0
    assert "Here is the conversation" not in text


def test_catalog_lists_are_catalog_facts_in_the_expected_order(world_dir):
    world = load_world(world_dir)
    docs = catalog_lists(world)
    assert docs == catalog_lists(World(world.config, world.catalog))
    by_director = {d.split(":\n")[0]: d.split(":\n")[1].split("\n") for d in docs if d.startswith("Films directed")}
    assert len(by_director) == len(world.directors)
    assert sum(len(v) for v in by_director.values()) == len(world.catalog)  # every film once
    for lines in by_director.values():
        years = [int(x.rsplit("(", 1)[1].rstrip(")")) for x in lines]
        assert years == sorted(years)
    horror_80s = next(d for d in docs if d.startswith("Horror films of the 1980s"))
    expected = sorted((i for i, it in enumerate(world.catalog)
                       if "Horror" in it.meta["genres"] and 1980 <= it.year <= 1989),
                      key=lambda i: -world.popularity[i])[:10]
    assert horror_80s.split("\n")[1:] == [f"{world.catalog[i].title} ({world.catalog[i].year})" for i in expected]
    with_lists = knowledge_corpus(world, **CORPUS, lists=True)
    assert len(with_lists) == len(knowledge_corpus(world, **CORPUS)) + 2 * len(docs)
    assert "USER:" not in "\n".join(with_lists)


def test_pack_joins_documents_with_endoftext_and_drops_the_tail(world_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world_dir / "base_model")
    docs = ["Heat (1995) is a crime film.", "People who liked Heat (1995) also liked Ronin (1998)."]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    stream = ids[0] + [sep] + ids[1] + [sep]
    blocks = pack(tok, docs, 5)
    assert blocks.shape == (len(stream) // 5, 5)
    assert blocks.flatten().tolist() == stream[: len(stream) // 5 * 5]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack(tok, docs, len(stream) + 1)


def test_short_pretraining_lowers_the_loss_on_held_out_fact_text(world_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world_dir / "base_model")
    pretrained = AutoModelForCausalLM.from_pretrained(world_dir / "base_model")
    random_base = build_base_model(tok, hidden_size=TINY.hidden_size, num_layers=TINY.num_layers,
                                   num_heads=TINY.num_heads, num_kv_heads=TINY.num_kv_heads,
                                   intermediate_size=TINY.intermediate_size,
                                   max_position_embeddings=TINY.max_position_embeddings, seed=TINY.seed)
    world = load_world(world_dir)
    # other wordings and other co-preference draws than the training corpus (seed 0)
    held_out = pack(tok, knowledge_corpus(world, fact_renderings=1, co_preference_sentences=100, seed=7), 64)[:32]
    before, after = lm_loss(random_base, held_out), lm_loss(pretrained, held_out)
    assert before > 6.0  # about log(768): a random model
    assert after < before - 1.5, (before, after)


def test_invalid_pretraining_config_is_refused():
    with pytest.raises(ValueError, match="pretrain_steps needs build_model"):
        build_world(dataclasses.replace(TINY, build_model=False), "unused")
    with pytest.raises(ValueError, match=">= 0"):
        dataclasses.replace(TINY, pretrain_steps=-1).validate()


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_world(dataclasses.replace(TINY, pretrain_steps=3), tmp_path / "w")
    assert torch.equal(torch.rand(3), expected)


def test_chat_questions_are_catalog_answers_in_chatml_and_change_no_other_document(world_dir):
    import re

    from rankgrpo.sandbox.pretrain import chat_question
    from rankgrpo.sandbox.world import rng_for

    world = load_world(world_dir)
    plain = knowledge_corpus(world, **CORPUS)
    with_chat = knowledge_corpus(world, **CORPUS, chat_questions=50)
    assert with_chat == knowledge_corpus(world, **CORPUS, chat_questions=50)  # deterministic
    assert sorted(with_chat) == sorted(plain + [d for d in with_chat if d.startswith("<|im_start|>")])
    rng = rng_for("pretrain-chat", 0)
    docs = [d for d in (chat_question(world, rng) for _ in range(200)) if d]  # "" when nothing matches
    names = {f"{it.title} ({it.year})": it for it in world.catalog}
    directed = 0
    for doc in docs:
        m = re.fullmatch(r"<\|im_start\|>user\n(.+)<\|im_end\|>\n<\|im_start\|>assistant\n(.+)<\|im_end\|>", doc,
                         flags=re.S)
        assert m, doc
        question, lines = m.group(1), m.group(2).split("\n")
        assert 1 <= len(lines) <= 20 and len(set(lines)) == len(lines)
        assert all(line in names for line in lines)  # every answer line is a catalog film
        who = re.fullmatch(r"(?:Which films did (.+) direct\?|List the films of (.+)\.|What has (.+) directed\?)",
                           question)
        if who:
            director = next(g for g in who.groups() if g)
            assert {names[x].meta["director"] for x in lines} == {director}
            directed += 1
    assert directed > 0
