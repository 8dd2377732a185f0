"""benchmarks/bench_lora_memory.py at tiny sizes: four child processes (full / LoRA, with and without
checkpointing), and --json written in either form of the flag."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--vocab", "256",
        "--rows", "2", "--prompt", "8", "--seq", "8", "--rank", "4", "--steps", "1"]


@pytest.mark.parametrize("form", ["space", "equals"])
def test_json_rows_in_either_flag_form(tmp_path, form):
    path = tmp_path / "rows.json"
    flag = ["--json", str(path)] if form == "space" else [f"--json={path}"]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora_memory.py"), *TINY, *flag],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(path.read_text())
    assert [(r["method"], r["checkpointing"]) for r in rows] == [("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]
    full, lora = rows[0], rows[2]
    assert lora["trained"] < full["trained"] == full["params"]
    assert "| LoRA r=4 |" in res.stdout
