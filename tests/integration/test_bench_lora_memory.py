"""benchmarks/bench_lora_memory.py at tiny sizes: four child processes (full / LoRA, with and without
checkpointing), and the rows written by --json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--vocab", "256",
        "--rows", "2", "--prompt", "8", "--seq", "8", "--rank", "4", "--steps", "1"]


def test_json_rows_with_the_flag_and_its_value_apart(tmp_path):
    path = tmp_path / "rows.json"
    flag = ["--json", str(path)]  # the form that used to reach the children as a stray argument
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora_memory.py"), *TINY, *flag],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(path.read_text())
    assert [(r["method"], r["checkpointing"]) for r in rows] == [("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]
    full, lora = rows[0], rows[2]
    assert lora["trained"] < full["trained"] == full["params"]
    assert "| LoRA r=4 |" in res.stdout
