"""benchmarks/lora_quality.py: every arm differs from full fine-tuning by its LoRA flags only, the RL
arms share the full-SFT start, and --quick runs end to end (runs, evaluations, the table)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_pipeline import world  # noqa: F401  (a fixture)

from rankgrpo.config import parse_config
from rankgrpo.sandbox import settings
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
lq = load_script(ROOT / "benchmarks" / "lora_quality.py")


def flags_of(cmd: list[str]) -> dict[str, str]:
    """--flag value pairs of a command; a flag followed by another flag (or nothing) maps to ''."""
    out = {}
    for i, word in enumerate(cmd):
        if word.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else "--"
            out[word] = "" if nxt.startswith("--") else nxt
    return out


def test_arms_differ_by_their_lora_flags_only(tmp_path):
    cfg = parse_config(lq.LoraQualityConfig, ["--out", str(tmp_path), "--ranks", "8", "32"])
    tasks = {t.name: t for t in lq.tasks(cfg, {"sft": 10.0, "rl": 10.0})}
    assert [n for n in tasks if n.startswith("train/")] == [
        "train/sft/full", "train/sft/lora8", "train/sft/lora32", "train/rl/full", "train/rl/lora8", "train/rl/lora32"]
    for stage, full_lr in (("sft", settings.SFT["lr"]), ("rl", settings.RL["lr"])):
        full = flags_of(tasks[f"train/{stage}/full"].cmd)
        assert "--lora-rank" not in full and "--lr" not in full  # the preset's lr
        for r in (8, 32):
            lora = flags_of(tasks[f"train/{stage}/lora{r}"].cmd)
            extra = {k: v for k, v in lora.items() if k not in full or full[k] != v}
            assert extra.pop("--out").endswith(f"{stage}/lora{r}")
            assert extra == {"--lora-rank": str(r), "--lora-alpha": str(2 * r), "--lr": f"{10 * full_lr:g}"}
    # every RL arm starts from the full SFT run's final checkpoint, after it
    for name in ("train/rl/full", "train/rl/lora8", "train/rl/lora32"):
        assert flags_of(tasks[name].cmd)["--model"] == str(tmp_path / "sft" / "full" / "final")
        assert tasks[name].deps == ["train/sft/full"]
    # reused full runs are not retrained
    cfg = parse_config(lq.LoraQualityConfig, ["--out", str(tmp_path), "--full-sft", "x/sft", "--full-rl", "x/rl"])
    tasks = {t.name: t for t in lq.tasks(cfg, {"sft": 1.0, "rl": 3.0})}
    assert tasks["train/sft/full"].done == Path("x/sft/final/config.json")
    assert flags_of(tasks["train/rl/lora8"].cmd)["--model"] == "x/sft/final"
    assert flags_of(tasks["train/rl/lora8"].cmd)["--lr"] == f"{3 * settings.RL['lr']:g}"


def test_the_probes_differ_by_the_learning_rate_and_score_validation_only(tmp_path):
    cfg = parse_config(lq.LoraQualityConfig, ["--out", str(tmp_path), "--lr-scales", "1", "3"])
    probes = {t.name: t for t in lq.probe_tasks(cfg)}
    assert sorted(probes) == ["probe/rl/x1", "probe/rl/x3", "probe/sft/x1", "probe/sft/x3"]
    for stage, full_lr in (("sft", settings.SFT["lr"]), ("rl", settings.RL["lr"])):
        f1, f3 = flags_of(probes[f"probe/{stage}/x1"].cmd), flags_of(probes[f"probe/{stage}/x3"].cmd)
        assert {k for k in f1 if f1[k] != f3.get(k)} == {"--lr", "--out"}
        assert (f1["--lr"], f3["--lr"]) == (f"{full_lr:g}", f"{3 * full_lr:g}") and f1["--lora-rank"] == "8"
        assert "test.jsonl" not in " ".join(probes[f"probe/{stage}/x1"].cmd)  # validation only
    # the choice: lowest validation loss for SFT, highest validation NDCG@20 for RL
    for stage, key, values in (("sft", "val_loss", (1.2, 0.9)), ("rl", "val_ndcg@20", (0.31, 0.30))):
        for scale, v in zip((1.0, 3.0), values):
            run = lq.probe_dir(cfg, stage, scale)
            run.mkdir(parents=True)
            (run / "log.jsonl").write_text(json.dumps({"step": 1, key: 5.0}) + "\n" + json.dumps({key: v}) + "\n")
    chosen = lq.select_scales(cfg)
    assert chosen["sft"]["chosen"] == 3.0 and chosen["rl"]["chosen"] == 1.0
    assert chosen["sft"]["scores"] == {"1": 1.2, "3": 0.9}


@pytest.mark.integration
def test_quick_runs_end_to_end(world, tmp_path, capsys):  # noqa: F811
    demos = tmp_path / "demos"
    demos.mkdir()
    for split in ("train", "validation"):
        shutil.copy(world / f"easy_{split}.jsonl", demos / f"{split}.jsonl")
    out = tmp_path / "lq"
    assert lq.main(["--world", str(world), "--demos", str(demos), "--out", str(out), "--ranks", "4",
                    "--lr-scales", "3", "--quick", "--jobs", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["rows"]) == ["sft/full", "sft/lora4", "rl/full", "rl/lora4"]
    assert summary["rows"]["sft/full"]["minus_full"] is None
    assert summary["rows"]["rl/lora4"]["minus_full"]["n"] == 6
    table = (out / "lora_quality.md").read_text()
    assert set(summary["selection"]) == {"sft", "rl"}
    assert json.loads((out / "lora_quality_config.json").read_text())["ranks"] == [4]  # the resolved config
    assert "chosen on validation" in table and "LoRA r = 4" in table and "LoRA r = 4" in capsys.readouterr().out
    # the LoRA SFT run trained adapters only and wrote the PEFT adapter beside merged weights
    assert (out / "sft" / "lora4" / "final" / "adapter" / "adapter_config.json").is_file()
