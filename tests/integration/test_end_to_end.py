"""Smoke test: the four scripts, as users run them, chained on a tiny sandbox world."""
import json

from rankgrpo.sandbox import SandboxConfig, build_world

from helpers import script


def test_four_scripts_end_to_end(tmp_path):
    world = tmp_path / "world"
    build_world(SandboxConfig(n_films=200, n_train=60, n_validation=10, n_test=10, hidden_size=64, num_layers=2,
                              num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=1024), world)
    cat = world / "catalog.jsonl"

    out = script("build_demos.py", "--world", world, "--out", tmp_path / "demos", "--train-fraction", 1.0,
                 "--report-train", 0)
    assert "adjust" in out
    demos = [json.loads(line) for line in (tmp_path / "demos" / "train.jsonl").read_text().splitlines()]
    assert len(demos) == 60 and all(d["completion"][0]["content"].count("\n") == 19 for d in demos)

    script("train_sft.py", "--model", world / "base_model", "--train-data", tmp_path / "demos" / "train.jsonl",
           "--val-data", tmp_path / "demos" / "validation.jsonl", "--catalog", cat, "--out", tmp_path / "sft",
           "--max-steps", 4, "--micro-batch-size", 4, "--eval-every", 100, "--val-gen-examples", 2,
           "--max-new-tokens", 16)
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["max_steps"] == 4

    script("train_rankgrpo.py", "--model", tmp_path / "sft" / "final", "--data", world / "train.jsonl",
           "--val-data", world / "validation.jsonl", "--catalog", cat, "--out", tmp_path / "rl", "--steps", 1,
           "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 16, "--eval-every", 1,
           "--val-examples", 2)
    log = [json.loads(line) for line in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert {"val_ndcg@20", "reward/rank_1"} <= set().union(*log)

    for name, model in (("sft", tmp_path / "sft" / "final"), ("rl", tmp_path / "rl" / "final")):
        out = script("evaluate.py", "--model", model, "--data", world / "test.jsonl", "--catalog", cat,
                     "--name", name, "--out", tmp_path / "eval" / name, "--max-new-tokens", 16)
        assert "N@20" in out and "hit rate by rank" in out
        rows = (tmp_path / "eval" / name / "examples.jsonl").read_text().splitlines()
        assert len(rows) == 10
    out = script("evaluate.py", "--compare", tmp_path / "eval" / "sft", tmp_path / "eval" / "rl")
    assert "sft " in out and "rl " in out
    # the paired difference it prints is the mean of the per-example differences
    rows = {n: {r["id"]: r for r in map(json.loads, (tmp_path / "eval" / n / "examples.jsonl").read_text().splitlines())}
            for n in ("sft", "rl")}
    diff = sum(rows["rl"][i]["ndcg@20"] - rows["sft"][i]["ndcg@20"] for i in rows["rl"]) / len(rows["rl"])
    assert "rl − sft: N@5 " in out and f"N@20 {diff:+.4f} ±" in out


def test_checkpoint_with_another_tokenizer_is_refused_before_work(tmp_path):
    import pytest

    from rankgrpo.models import load_tokenizer, tiny_model
    from rankgrpo.trainer import check_tokenizer_matches

    world = tmp_path / "world"
    build_world(SandboxConfig(n_films=200, n_train=5, n_validation=1, n_test=1, hidden_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1, intermediate_size=64), world)
    tokenizer = load_tokenizer(world / "base_model")
    with pytest.raises(SystemExit, match="trained with a different tokenizer"):
        check_tokenizer_matches(tiny_model("qwen2", vocab_size=256), tokenizer, "ckpt")
