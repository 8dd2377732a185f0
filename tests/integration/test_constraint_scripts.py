"""`--constrained` through the scripts as users run them, on a tiny sandbox world: every line
that evaluate.py and train_rankgrpo.py generate is a catalog line, none twice, no seen title."""
import json

from rankgrpo.catalog import load_catalog, normalize_title
from rankgrpo.constraint import catalog_lines
from rankgrpo.data import load_examples
from rankgrpo.sandbox import SandboxConfig, build_world

from helpers import script


def test_evaluate_and_train_with_constrained(tmp_path):
    world = tmp_path / "world"
    build_world(SandboxConfig(n_films=200, n_train=20, n_validation=4, n_test=4, hidden_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=1024), world)
    cat = world / "catalog.jsonl"
    lines = set(catalog_lines(load_catalog(cat)))

    # the random base model: without the constraint nothing it writes is in the catalog
    common = ("--model", world / "base_model", "--data", world / "test.jsonl", "--catalog", cat,
              "--n-items", 4, "--max-new-tokens", 120)
    script("evaluate.py", *common, "--out", tmp_path / "plain")
    out = script("evaluate.py", *common, "--constrained", "--out", tmp_path / "constrained", "--trie-cache",
                 tmp_path / "trie")
    assert list((tmp_path / "trie").glob("catalog-trie-*.npz"))
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())["results"]
    constrained = json.loads((tmp_path / "constrained" / "results.json").read_text())["results"]
    assert plain["in_catalog"]["mean"] < 0.5 and constrained["in_catalog"]["mean"] == 1.0, out
    examples = load_examples(world / "test.jsonl")
    rows = [json.loads(r) for r in (tmp_path / "constrained" / "examples.jsonl").read_text().splitlines()]
    for ex, row in zip(examples, rows):
        written = [line for line in row["completion"].split("\n") if line]
        assert len(written) >= 4 and set(written) <= lines and len(set(written)) == len(written)
        seen = {normalize_title(t) for t in ex.seen_titles}
        assert not any(normalize_title(line.rsplit(" (", 1)[0]) in seen for line in written)

    script("train_rankgrpo.py", "--model", world / "base_model", "--data", world / "train.jsonl",
           "--val-data", world / "validation.jsonl", "--catalog", cat, "--out", tmp_path / "rl", "--steps", 1,
           "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 120, "--n-items", 4,
           "--stop-after-lines", 4, "--eval-every", 1, "--val-examples", 2, "--constrained")
    log = [json.loads(line) for line in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["constrained"] is True
    step = [row for row in log if "reward/rank_1" in row][0]
    val = [row["val_in_catalog"] for row in log if "val_in_catalog" in row]
    assert step["in_catalog"] == 1.0 and val and all(v == 1.0 for v in val)
