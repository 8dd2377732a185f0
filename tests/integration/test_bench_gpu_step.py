"""The GPU-step benchmark (benchmarks/bench_gpu_step.py) runs its full Rank-GRPO step on the CPU
with the tiny preset: sampling, reference and policy log-probs, loss, backward and an AdamW
step that really moves the weights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
bgs = load_script(ROOT / "benchmarks" / "bench_gpu_step.py")

TINY = ["--tiny", "--device", "cpu", "--steps", "1"]


def test_tiny_step_on_cpu_writes_finite_figures_and_trains(tmp_path):
    path = tmp_path / "x.json"
    result = bgs.main([*TINY, "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["completions_per_step"] == 2 * 8  # tiny preset: 2 prompts x G = 8
    for stage in (*bgs.STAGES, "step"):
        assert math.isfinite(data["seconds"][stage]) and data["seconds"][stage] > 0, stage
    assert data["samples_per_s"] > 0 and data["completion_tokens_per_s"] > 0
    assert 0 < data["completion_tokens_per_step"] <= 16 * 24
    assert data["memory_gib"]["peak_allocated"] is None  # no CUDA: "n/a", written as null
    assert data["n_params"] > 0 and data["memory_gib"]["analytic_static"]["total"] > 0
    assert math.isfinite(data["loss"]) and data["grad_norm"] > 0
    # the AdamW step moved the policy away from its frozen starting copy (the reference)
    assert data["weights"]["max_abs_change"] > 0 and data["weights"]["changed_frac"] > 0.5
    assert result["weights"] == data["weights"]


def test_weight_change_is_zero_without_an_update():
    """The weight-change figure can fail: with lr 0 the policy stays equal to the reference."""
    result = bgs.main([*TINY, "--warmup-steps", "0", "--lr", "0"])
    assert result["weights"] == {"max_abs_change": 0.0, "changed_frac": 0.0}


def test_equal_segments_and_static_memory():
    ranks = bgs.equal_segments(torch.tensor([40, 3]), 41, 20)
    assert ranks[0, :40].tolist() == [k for k in range(20) for _ in range(2)] and ranks[0, 40] == -1
    assert ranks[1].tolist()[:4] == [0, 6, 13, -1]
    # Qwen2.5-0.5B in float32: 4 + 4 + 8 + 4 bytes per parameter
    mem = bgs.static_memory(494_032_768, "float32")
    assert math.isclose(mem["total"], 20 * 494_032_768 / 2**30)
    assert math.isclose(bgs.static_memory(10, "bfloat16")["total"] * 2, bgs.static_memory(10, "float32")["total"])
