"""The embedded offline world: determinism, data validity, tokenizer/model, teacher behaviour."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from rankgrpo.catalog import load_catalog, normalize_title
from rankgrpo.data import load_examples
from rankgrpo.demos.prompts import build_judge_prompt, build_metadata_prompt
from rankgrpo.parsing import parse_line, parse_recommendations
from rankgrpo.sandbox import (
    SandboxConfig,
    SandboxTeacher,
    build_base_model,
    build_world,
    calibrate,
    ensure_world,
    load_world,
    oracle_baseline,
    popularity_baseline,
)
from rankgrpo.sandbox.__main__ import main as sandbox_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL = SandboxConfig(n_films=300, n_train=200, n_validation=50, n_test=50, vocab_size=1024, hidden_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      max_position_embeddings=1024)
SPLITS = ("train", "validation", "test")
DATA_FILES = ("catalog.jsonl", "train.jsonl", "validation.jsonl", "test.jsonl", "hidden/tastes.jsonl")
MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sandbox") / "world"
    build_world(SMALL, out)
    return out


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


@pytest.fixture(scope="module")
def examples(world):
    return [ex for split in SPLITS for ex in world.examples(split)]


def _unique_prompts(examples):
    return list({ex.prompt_text: ex for ex in examples}.values())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(world_dir, tmp_path):
    again = tmp_path / "again"
    build_world(SMALL, again)
    for name in DATA_FILES + tuple(f"base_model/{m}" for m in MODEL_FILES):
        assert (world_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    build_world(dataclasses.replace(SMALL, seed=1, build_model=False), other)
    for name in DATA_FILES:
        assert (world_dir / name).read_bytes() != (other / name).read_bytes(), name


def test_manifest_records_config_and_checksums(world_dir):
    import hashlib

    manifest = json.loads((world_dir / "hidden" / "world.json").read_text())
    assert manifest["config"] == dataclasses.asdict(SMALL)
    for name in DATA_FILES:
        assert manifest["sha256"][name] == hashlib.sha256((world_dir / name).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- data


def test_catalog_loads_with_metadata_remakes_and_variety(world_dir, world):
    catalog = load_catalog(world_dir / "catalog.jsonl")
    assert len(catalog) == SMALL.n_films and not catalog.report.dropped
    for it in catalog:
        assert 1940 <= it.year <= 2024
        assert {"genres", "keywords", "director", "popularity", "plot"} <= set(it.meta)
        assert 1 <= len(it.meta["genres"]) <= 3 and it.meta["keywords"] and it.meta["plot"]
    titles = [it.title for it in catalog]
    by_title: dict[str, list[int]] = {}
    for it in catalog:
        by_title.setdefault(normalize_title(it.title), []).append(it.year)
    remakes = [ys for ys in by_title.values() if len(ys) > 1]
    assert remakes and all(abs(a - b) > 2 for ys in remakes for a in ys for b in ys if a != b)
    assert any(t.startswith("The ") for t in titles) and any(":" in t for t in titles)
    assert any("'" in t for t in titles) and any("&" in t for t in titles)
    pop = np.sort(world.popularity)[::-1]
    assert pop[0] > 20 * np.median(pop)  # long tail


def test_splits_are_valid_disjoint_and_time_ordered(world_dir):
    splits = {s: load_examples(world_dir / f"{s}.jsonl") for s in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [SMALL.n_train, SMALL.n_validation, SMALL.n_test]
    ids = [ex.id for s in SPLITS for ex in splits[s]]
    assert len(ids) == len(set(ids))
    prompts = {s: {ex.prompt_text for ex in splits[s]} for s in SPLITS}
    assert not (prompts["train"] & prompts["validation"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["validation"] & prompts["test"])
    dates = [ex.extra["date"] for s in SPLITS for ex in splits[s]]
    assert dates == sorted(dates)
    assert max(ex.extra["date"] for ex in splits["train"]) <= min(ex.extra["date"] for ex in splits["test"])


def test_prompts_follow_the_paper_format(world_dir, examples):
    from rankgrpo.data import build_prompt

    for ex in examples:
        assert ex.prompt_text == build_prompt(ex.conversation)
        assert ex.conversation.startswith("USER: ") and ex.conversation.endswith("\n")
    raw = json.loads((world_dir / "test.jsonl").read_text(encoding="utf-8").split("\n")[0])
    assert set(raw) == {"id", "prompt", "seen_titles", "groundtruth_with_release_year", "num_groundtruth", "date"}
    assert isinstance(raw["groundtruth_with_release_year"][0][1], str)  # years as strings, like the released data


def test_groundtruth_in_catalog_never_seen_and_sized(world, examples):
    for ex in examples:
        assert 1 <= len(ex.groundtruth) <= SMALL.max_groundtruth
        seen = {normalize_title(s) for s in ex.seen_titles}
        for title, year in ex.groundtruth:
            assert world.catalog.lookup(title, year, tolerance=0) is not None
            assert normalize_title(title) not in seen
        assert len(set(ex.groundtruth)) == len(ex.groundtruth)
        assert all(world.catalog.has_title(s) for s in ex.seen_titles)


def test_conversations_carry_signal_about_the_taste(world, examples):
    """Genre words of the latent taste appear in most conversations (the learnable signal)."""
    from rankgrpo.sandbox import vocab

    hits = 0
    for ex in examples:
        taste = world.taste_of(ex.conversation)
        assert taste is not None
        words = [s for g in vocab.GENRES if g.name in taste.genres for s in g.synonyms + g.moods]
        hits += any(w in ex.conversation.lower() for w in words)
    assert hits / len(examples) > 0.6


# ----------------------------------------------------------------------------- tokenizer and model


@pytest.fixture(scope="module")
def tokenizer(world_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world_dir / "base_model")


def test_tokenizer_round_trips_every_title_and_list(world_dir, world, tokenizer, examples):
    def rt(text):
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False)

    for it in world.catalog:
        assert rt(it.title) == it.title
        assert rt(f"{it.title} ({it.year})") == f"{it.title} ({it.year})"
    lines = "\n".join(f"{it.title} ({it.year})" for it in list(world.catalog)[:20])
    assert rt(lines) == lines and rt(examples[0].prompt_text) == examples[0].prompt_text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"
    # what from_pretrained gives is the tokenizer that was built and saved
    saved = json.loads((world_dir / "base_model" / "tokenizer.json").read_text(encoding="utf-8"))
    assert json.loads(tokenizer.backend_tokenizer.to_str())["normalizer"] == saved["normalizer"]
    assert json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"] == saved["pre_tokenizer"]


def test_chat_template_assistant_mask_is_exactly_completion_and_end(tokenizer, examples):
    ex = examples[0]
    completion = "\n".join(f"{t} ({y})" for t, y in ex.groundtruth)
    messages = ex.messages + [{"role": "assistant", "content": completion}]
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    on = [i for i, m in enumerate(mask) if m]
    assert on == list(range(on[0], on[-1] + 1))  # one contiguous block
    assert tokenizer.decode(ids[on[0]: on[-1] + 1]) == completion + "<|im_end|>"
    assert ids[on[-1]] == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(prompt) == ids[: on[0]]


def test_base_model_loads_with_identical_logits(world_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(world_dir / "base_model").eval()
    rebuilt = build_base_model(tokenizer, hidden_size=SMALL.hidden_size, num_layers=SMALL.num_layers,
                               num_heads=SMALL.num_heads, num_kv_heads=SMALL.num_kv_heads,
                               intermediate_size=SMALL.intermediate_size,
                               max_position_embeddings=SMALL.max_position_embeddings, seed=SMALL.seed)
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and loaded.config.tie_word_embeddings
    assert loaded.config.eos_token_id == tokenizer.eos_token_id
    assert loaded.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("USER: scary 80s movies?\nThe Haunting (1984)")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rebuilt(ids).logits)


def test_an_untied_base_model_has_its_own_head_and_survives_save_and_load(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from rankgrpo.sandbox.model import save_base_model

    kw = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
              max_position_embeddings=256, seed=1)
    tied = build_base_model(tokenizer, **kw)
    untied = build_base_model(tokenizer, tie_embeddings=False, **kw)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 32 * len(tokenizer)
    save_base_model(tmp_path / "untied", tokenizer, untied)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert not loaded.config.tie_word_embeddings
    ids = torch.tensor([tokenizer.encode("USER: scary 80s movies?\nThe Haunting (1984)")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, untied(ids).logits)


# ----------------------------------------------------------------------------- the teacher


def _lists(world, teacher, examples):
    return [parse_recommendations(teacher.chat(ex.messages)) for ex in _unique_prompts(examples)]


def test_teacher_answers_twenty_lines_deterministically(world, examples):
    teacher = SandboxTeacher(world)
    ex = examples[3]
    a = teacher.chat(ex.messages)
    assert a == teacher.chat(ex.messages) == SandboxTeacher(world).chat(ex.messages)
    assert len(a.split("\n")) == 20 and not a.endswith("\n")
    assert a != SandboxTeacher(world, seed=1).chat(ex.messages)


def test_teacher_out_of_catalog_rate_matches_its_parameter(world, examples):
    teacher = SandboxTeacher(world, ooc_rate=0.3, format_slip_rate=0.0)
    lists = _lists(world, teacher, examples)
    items = [it for items in lists for it in items]
    assert all(it.exact for it in items)
    ooc = np.array([world.catalog.lookup(it.title, it.year, 2) is None for it in items], dtype=float)
    se = math.sqrt(0.3 * 0.7 / len(ooc))
    assert abs(ooc.mean() - 0.3) < 4 * se + 0.01
    head = np.mean([world.catalog.lookup(it.title, it.year, 2) is None for items in lists for it in items[:10]])
    tail = np.mean([world.catalog.lookup(it.title, it.year, 2) is None for items in lists for it in items[10:]])
    assert tail > head  # hallucinations grow toward the tail


def test_teacher_format_slip_rate_matches_its_parameter(world, examples):
    teacher = SandboxTeacher(world, ooc_rate=0.0, format_slip_rate=0.2)
    items = [it for items in _lists(world, teacher, examples) for it in items]
    slips = np.array([not it.exact for it in items], dtype=float)
    assert abs(slips.mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(slips)) + 0.01
    # without failure modes every line is an exact in-catalog "Title (Year)"
    clean = SandboxTeacher(world, ooc_rate=0.0, format_slip_rate=0.0)
    for items in _lists(world, clean, examples[:40]):
        assert len(items) == 20 and all(it.exact and world.catalog.contains(it.title, it.year) for it in items)


def _true_ranks(world, ex, items):
    """Rank of each listed catalog film under the true latent relevance (0 = best)."""
    s = world.relevance(world.taste_of(ex.conversation), timeless=True)
    order = np.empty(len(s), dtype=int)
    order[np.argsort(-s, kind="stable")] = np.arange(len(s))
    return [order[world.catalog.lookup(it.title, it.year, 2)] for it in items]


def test_teacher_tail_drift_and_popularity_bias(world, examples):
    exs = _unique_prompts(examples)[:80]

    def stats(**kw):
        t = SandboxTeacher(world, ooc_rate=0.0, format_slip_rate=0.0, **kw)
        tail, pop = [], []
        for ex in exs:
            items = parse_recommendations(t.chat(ex.messages))
            tail += _true_ranks(world, ex, items[15:])
            pop += [world.log_pop_z[world.catalog.lookup(it.title, it.year, 2)] for it in items]
        return np.mean(tail), np.mean(pop)

    tail0, pop0 = stats(tail_noise=0.0, popularity_bias=0.0)
    tail1, _ = stats(tail_noise=1.0, popularity_bias=0.0)
    _, pop2 = stats(tail_noise=0.0, popularity_bias=2.0)
    assert tail1 > tail0 + 10
    assert pop2 > pop0 + 0.3


def test_teacher_metadata_for_real_and_invented_titles(world, examples):
    teacher = SandboxTeacher(world, ooc_rate=0.5, format_slip_rate=0.0)
    n_ooc = shared = 0
    for ex in _unique_prompts(examples)[:30]:
        for it in parse_recommendations(teacher.chat(ex.messages)):
            reply = teacher.chat([{"role": "user", "content": build_metadata_prompt(it.title, it.year)}])
            lines = reply.split("\n")
            assert len(lines) == 3 and lines[0] == f"{it.title} ({it.year})"
            assert lines[1].startswith("Keywords: ") and lines[2].startswith("Plots: ") and len(lines[2]) > 40
            if world.catalog.lookup(it.title, it.year, 2) is None:
                n_ooc += 1
                source, how = teacher.resolve(it.title, it.year)
                assert source is not None and how in ("invented", "misspelled", "wrong_year")
                # the description resembles the film the name was derived from
                true_kw = set(world.catalog[source].meta["keywords"])
                said_kw = set(lines[1][len("Keywords: "):].split(", "))
                shared += bool(true_kw & said_kw)
    assert n_ooc > 50 and shared / n_ooc > 0.9
    odd = teacher.chat([{"role": "user", "content": build_metadata_prompt("Zzyzx Qwerty", None)}])
    assert odd.startswith("Zzyzx Qwerty (") and "\nKeywords: " in odd and "\nPlots: " in odd


def _parse_judge(reply):
    out = {}
    for line in reply.split("\n"):
        if "####" in line:
            name, _, rating = line.rpartition("####")
            if rating.strip().lstrip("-").isdigit():
                out[parse_line(name)] = int(rating)
    return out


def _ranks(values):
    """Ranks with ties averaged."""
    a = np.asarray(values, dtype=float)
    r = np.empty(len(a))
    r[np.argsort(a, kind="stable")] = np.arange(len(a))
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def _spearman(a, b):
    return np.corrcoef(_ranks(a), _ranks(b))[0, 1]


def test_judge_replies_parse_and_follow_latent_relevance(world, examples):
    teacher = SandboxTeacher(world, judge_slip_rate=0.0)
    rhos, gt_ratings, other_ratings = [], [], []
    for ex in _unique_prompts(examples)[:60]:
        s = world.relevance(world.taste_of(ex.conversation), timeless=True)
        order = np.argsort(-s, kind="stable")
        picks = list(order[:10]) + list(order[10:300:30]) + list(order[300::40])
        cands = [(world.catalog[int(i)].title, world.catalog[int(i)].year) for i in picks]
        reply = teacher.chat([{"role": "user", "content": build_judge_prompt(ex.conversation, cands)}])
        parsed = _parse_judge(reply)
        assert set(parsed) == set(cands) and len(reply.split("\n")) == len(cands)
        assert all(-2 <= r <= 2 for r in parsed.values())
        rhos.append(_spearman([parsed[c] for c in cands], s[picks]))
        gt = teacher.chat([{"role": "user", "content": build_judge_prompt(ex.conversation, ex.groundtruth)}])
        gt_ratings += list(_parse_judge(gt).values())
        other_ratings += [parsed[c] for c in cands[10:]]
    assert np.mean(rhos) > 0.5, np.mean(rhos)
    assert np.mean(gt_ratings) > np.mean(other_ratings) + 1.0


def test_judge_slip_rate_matches_its_parameter(world, examples):
    teacher = SandboxTeacher(world, judge_slip_rate=0.2)
    total = good = 0
    for j, ex in enumerate(_unique_prompts(examples)[:60]):
        cands = [(world.catalog[i].title, world.catalog[i].year) for i in range(j % 10, 300, 10)]
        parsed = _parse_judge(teacher.chat([{"role": "user", "content": build_judge_prompt(ex.conversation, cands)}]))
        total += len(cands)
        good += sum(c in parsed for c in cands)
    assert abs((1 - good / total) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / total) + 0.01


def test_teacher_handles_unknown_conversations(world):
    from rankgrpo.data import build_prompt

    teacher = SandboxTeacher(world, ooc_rate=0.0, format_slip_rate=0.0)
    reply = teacher.chat([{"role": "user", "content": build_prompt("USER: Any scary horror movies?\n")}])
    items = parse_recommendations(reply)
    assert len(items) == 20
    genres = [world.catalog[world.catalog.lookup(it.title, it.year)].meta["genres"] for it in items]
    assert sum("Horror" in g for g in genres) >= 15
    vague = teacher.chat([{"role": "user", "content": build_prompt("USER: hello\n")}])
    assert len(parse_recommendations(vague)) == 20


def test_unknown_teacher_parameter_is_refused(world):
    with pytest.raises(TypeError, match="ooc_rte"):
        SandboxTeacher(world, ooc_rte=0.1)
    with pytest.raises(ValueError):
        SandboxTeacher(world, ooc_rate=0.9)


# ----------------------------------------------------------------------------- baselines and CLI


def test_baselines_bracket_the_teacher(world):
    res = calibrate(world, split="train", limit=150)
    r = {name: res[name]["recall@20"]["mean"] for name in res}
    assert r["popularity"] < r["teacher (raw)"] < r["oracle"], r
    assert 0.55 <= res["teacher (raw)"]["in_catalog"]["mean"] <= 0.9


def test_baselines_exclude_seen_films(world, examples):
    for ex in examples[:50]:
        seen = {normalize_title(s) for s in ex.seen_titles}
        for recs in (popularity_baseline(world, ex.seen_titles), oracle_baseline(world, ex)):
            assert len(recs) == 20 and not seen & {normalize_title(t) for t, _ in recs}


def test_cli_builds_and_calibrates(tmp_path, world_dir, capsys):
    out = tmp_path / "cli"
    sandbox_main(["--out", str(out), "--n-films", "200", "--n-train", "20", "--n-validation", "5",
                  "--n-test", "5", "--no-build-model"])
    assert len(load_examples(out / "test.jsonl")) == 5 and not (out / "base_model").exists()
    sandbox_main(["calibrate", "--world", str(world_dir), "--limit", "10", "--ooc-rate", "0.1"])
    printed = capsys.readouterr().out
    assert "oracle" in printed and "in-catalog ratio" in printed
    # --resume (make demo's rerun) keeps a complete world built from the same settings, rebuilds otherwise
    argv = ["--out", str(out), "--n-films", "200", "--n-train", "20", "--n-validation", "5", "--n-test", "5",
            "--no-build-model", "--resume"]
    stamp = (out / "test.jsonl").stat().st_mtime_ns
    sandbox_main(argv)
    assert (out / "test.jsonl").stat().st_mtime_ns == stamp and "ready in" in capsys.readouterr().out
    sandbox_main(argv[:-2] + ["--n-test", "6", "--no-build-model", "--resume"])
    assert len(load_examples(out / "test.jsonl")) == 6


def test_ensure_world_reuses_and_rebuilds(tmp_path):
    cfg = dataclasses.replace(SMALL, n_films=200, n_train=10, n_validation=5, n_test=5, build_model=False)
    ensure_world(tmp_path, cfg, verbose=False)
    stamp = (tmp_path / "train.jsonl").stat().st_mtime_ns
    ensure_world(tmp_path, cfg, verbose=False)
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == stamp
    ensure_world(tmp_path, dataclasses.replace(cfg, seed=3), verbose=False)
    assert json.loads((tmp_path / "hidden" / "world.json").read_text())["config"]["seed"] == 3
    # a world written by other generator code is rebuilt
    manifest_path = tmp_path / "hidden" / "world.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "generator": "older"}))
    ensure_world(tmp_path, dataclasses.replace(cfg, seed=3), verbose=False)
    assert json.loads(manifest_path.read_text())["generator"] == manifest["generator"]


def test_bad_config_and_missing_world_are_reported(tmp_path):
    with pytest.raises(ValueError, match="n_films"):
        build_world(dataclasses.replace(SMALL, n_films=10), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a sandbox world"):
        load_world(tmp_path)


def test_baseline_command_writes_lists_that_evaluate_scores_as_calibrate_does(tmp_path, world_dir, world):
    """`python -m rankgrpo.sandbox baseline` + `evaluate.py --predictions` give calibrate's numbers."""
    from rankgrpo.evaluation import load_predictions, score_examples

    res = calibrate(world, split="test", limit=None)
    examples = load_examples(world_dir / "test.jsonl")
    for kind, key in (("popularity", "popularity"), ("oracle", "oracle"), ("teacher", "teacher (raw)")):
        path = tmp_path / f"{kind}.jsonl"
        sandbox_main(["baseline", "--world", str(world_dir), "--kind", kind, "--out", str(path)])
        agg, _ = score_examples(examples, load_predictions(str(path), examples), world.catalog)
        assert agg["ndcg@20"]["mean"] == pytest.approx(res[key]["ndcg@20"]["mean"], abs=1e-12), kind
        assert agg["recall@5"]["mean"] == pytest.approx(res[key]["recall@5"]["mean"], abs=1e-12), kind
    sandbox_main(["baseline", "--world", str(world_dir), "--kind", "popularity", "--limit", "3",
                  "--out", str(tmp_path / "three.jsonl")])
    rows = load_predictions(str(tmp_path / "three.jsonl"), examples[:3])
    assert len((tmp_path / "three.jsonl").read_text().splitlines()) == 3 and len(rows) == 3
