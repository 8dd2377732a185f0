"""benchmarks/objective_ablation.py: its arms differ from their base by one rule each, and --quick
runs end to end on a tiny world (RL, evaluation, paired differences, summary.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import world  # noqa: F401  (a fixture)

from rankgrpo.rl import OBJECTIVES
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
ablation = load_script(ROOT / "benchmarks" / "objective_ablation.py")

RULES = list(OBJECTIVES["paper"])


def test_every_rule_has_one_arm_that_switches_it_alone():
    arms = {a.name: a for a in ablation.arms()}
    singles = [a for a in arms.values() if "+" in a.name]
    assert sorted(a.name.split("+")[1] for a in singles) == sorted(RULES)
    for a in singles:
        base = arms[a.base]
        extra = [f for f in a.flags if f not in base.flags]
        rule = a.name.split("+")[1]
        assert extra == [f"--{rule.replace('_', '-')}", str(OBJECTIVES["authors"][rule])], a.name
    assert [a.name for a in arms.values() if a.all_seeds] == ["paper", "authors"]


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_quick_runs_end_to_end(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ablation"
    argv = ["--sft", str(world / "base_model"), "--data", str(world / "easy_train.jsonl"),
            "--val-data", str(world / "easy_validation.jsonl"), "--catalog", str(world / "catalog.jsonl"),
            "--test-data", str(world / "test.jsonl"), "--out", str(out), "--quick"]
    assert ablation.main(argv) == 0
    printed = capsys.readouterr().out
    assert "paired differences" in printed and "authors − paper over 3 seed(s)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "objective_ablation_config.json").read_text())["quick"] is True
    assert set(summary["arms"]) == {a.name for a in ablation.arms() if a.base}
    assert [int(s) for s in summary["authors_minus_paper"]["per_seed"]] == [3407, 3408, 3409]
    assert all(d["n"] == 6 for d in summary["arms"].values())
    md = (out / "objective_ablation.md").read_text()
    assert "| 6 | paper+reward_matching |" in md and "| 7 | grpo-paper+baseline_aggregation |" in md
    assert "| 1–7 | authors |" in md and "| over 3 seeds |" in md and md.count("\n| seed 34") == 3
    # each run's resolved settings: the base's, but for the one rule the arm switches
    for name, d in summary["arms"].items():
        rule = name.split("+")[1] if "+" in name else None
        config = json.loads((out / "runs" / name / "seed3407" / "config.json").read_text())
        for r in RULES:
            objective = "authors" if rule is None or r == rule else "paper"
            assert config[r] == OBJECTIVES[objective][r], (name, r)
    # a rerun finds every run and evaluation done and only prints the summary again
    assert ablation.main(argv) == 0
    assert "== train" not in capsys.readouterr().out
