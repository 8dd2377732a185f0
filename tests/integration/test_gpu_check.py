"""benchmarks/gpu_check.py: the decode bound and bytes per token by hand, the peak table, the
eager/compiled near-tie comparison, the tests part's outcome parsing, the GQA path classification,
a run killed halfway, and the whole check in its --tiny form on the CPU (the same code path a GPU
run takes, with tiny shapes)."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
gpu_check = load_script(ROOT / "benchmarks" / "gpu_check.py")


def test_decode_bound_by_hand():
    """The docstring's example: 1 layer, N = 1000 weights of 2 bytes, 1 prompt x G = 2, L = 3, T = 2,
    1 KV head and 2 query heads of 4 dimensions, 1 GB/s, 1 TFLOP/s."""
    config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, num_attention_heads=2, hidden_size=8,
                             head_dim=4)
    b = gpu_check.decode_bound(config, 1000, 2, prompts=1, group_size=2, prompt_len=3, new_tokens=2,
                               bandwidth_gbs=1, tflops=1)
    # bytes: 2000 + 2*1*2*1*4*2*c = 2096 (c = 3) and 2128 (c = 4); flops: 4000 + 64c
    assert b["memory_s"] == pytest.approx((2096 + 2128) / 1e9)
    assert b["compute_s"] == pytest.approx((4000 + 192 + 4000 + 256) / 1e12)
    assert b["prefill_s"] == pytest.approx(2 * 1000 * 1 * 3 / 1e12)
    assert b["seconds"] == pytest.approx(6e-9 + 4224e-9)
    assert b["tokens_per_s"] == pytest.approx(4 / 4.230e-6)
    # compute-bound when FLOPs are slow: each step takes its FLOP time instead
    slow = gpu_check.decode_bound(config, 1000, 2, prompts=1, group_size=2, prompt_len=3, new_tokens=2,
                                  bandwidth_gbs=1, tflops=1e-6)
    assert slow["seconds"] == pytest.approx((6000 + 4192 + 4256) / 1e6)
    assert gpu_check.decode_bound(config, 1000, 2, prompts=1, group_size=2, prompt_len=3, new_tokens=2,
                                  bandwidth_gbs=None, tflops=1)["tokens_per_s"] is None


def test_device_peaks():
    assert gpu_check.device_peaks("NVIDIA H100 80GB HBM3")["bandwidth_gbs"] == 3350
    assert gpu_check.device_peaks("NVIDIA H100 PCIe")["bandwidth_gbs"] == 2000
    assert gpu_check.device_peaks("NVIDIA H200")["bandwidth_gbs"] == 4800
    assert gpu_check.device_peaks("NVIDIA A100-SXM4-80GB")["tflops"] == 312
    unknown = gpu_check.device_peaks("Some Accelerator")
    assert unknown["bandwidth_gbs"] is None and "pass --peak-bandwidth-gbs" in unknown["source"]
    given = gpu_check.device_peaks("NVIDIA H200", bandwidth_gbs=4000)
    assert (given["bandwidth_gbs"], given["tflops"]) == (4000, 989) and "command line" in given["source"]


def test_tiny_check_on_cpu(tmp_path):
    result = gpu_check.main(["--tiny", "--out", str(tmp_path), "--repeats", "1",
                             "--peak-bandwidth-gbs", "20", "--peak-tflops", "0.2"])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["parts"].keys() == set(gpu_check.PARTS) and data["finished"]
    assert data["part_budgets_s"] == gpu_check.TINY_PART_BUDGETS_S
    assert all(p["wall_s"] <= data["seconds"] for p in data["parts"].values() if "wall_s" in p)
    tests = data["parts"]["tests"]  # collected without a GPU: every one skipped, so none ran
    assert tests["status"] == "not run" and tests["passed"] == 0 and tests["skipped"] >= 1
    assert tests["returncode"] == 0 and "tests/components/test_cuda.py" in tests["files"]

    a = data["parts"]["attention"]
    assert a["status"] == "passed" and a["attn_implementation"] == "sdpa"
    paths = {(prompts, call): c["gqa_path"] for prompts, calls in a["paths"].items() for call, c in calls.items()}
    # transformers' SDPA integration: no mask -> enable_gqa; a padding mask -> K/V repeated, except
    # for a one-token eager query (regrouped); the compiled step always has a mask (its static cache)
    assert paths == {("equal_length_prompts", "prefill"): "enable_gqa",
                     ("equal_length_prompts", "eager_decode"): "enable_gqa",
                     ("equal_length_prompts", "compiled_decode"): "repeat_kv",
                     ("padded_prompts", "prefill"): "repeat_kv",
                     ("padded_prompts", "eager_decode"): "pack_gqa",
                     ("padded_prompts", "compiled_decode"): "repeat_kv"}
    b = a["bytes_per_decoded_token"]
    assert b["rows"] == 8 and b["n_rep"] == 2 and b["kv_repeated"] == 2 * b["kv"] > 0

    s = data["parts"]["sampler"]
    assert s["status"] == "passed" and s["rows"] == 8
    for name in ("sample", "sample_compiled", "generate"):
        m = s["methods"][name]
        assert m["tokens"] == 8 * 24 and m["tokens_per_s"] > 0 and 0 < m["share_of_bound"] < 1
        assert m["vs_generate"] == pytest.approx(m["tokens_per_s"] / s["methods"]["generate"]["tokens_per_s"])
    assert s["compiled_decode_stats"]["graphs_compiled"] == 0, "the timed shapes were compiled in the warm-up"
    assert s["bound"]["tokens_per_s"] > s["bound_kv_repeated"]["tokens_per_s"] > 0
    assert math.isfinite(s["compiled_vs_eager"])
    g = s["greedy_eager_vs_compiled"]  # float32 on the CPU: the same greedy tokens
    assert g["rows"] == 8 and g["mismatch"] == 0 and g["tolerance_rel"] == 1e-5 and g["max_abs_logprob_diff"] < 1e-4

    gen = data["parts"]["generators"]
    assert gen["status"] == "passed" and set(gen["per_prompt_over_shared"]) == {"eager", "compiled"}
    assert all(r["tokens"] == 8 * 24 for r in gen["runs"].values())
    assert gen["pairs"] == gpu_check.TINY_GENERATOR_REPEATS
    for mode, ratios in gen["pair_ratios"].items():  # the reported ratio is the median of the interleaved pairs
        assert len(ratios) == gen["pairs"] and gen["per_prompt_over_shared"][mode] == statistics.median(ratios)

    rl = data["parts"]["rl_step"]
    assert rl["status"] == "passed" and rl["completions"] == 16 and rl["samples_per_s"] > 0
    assert set(rl["stage_seconds"]) >= {"sample", "score", "reference", "update", "step"}
    assert data["parts"]["torchrun"]["status"] == "skipped" and "GPU" in data["parts"]["torchrun"]["reason"]

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| sample_compiled |" in table and "| update |" in table and "Decode bound" in table
    assert "| tests | not run |" in table and "| sampler | passed |" in table and "UNFINISHED" not in table
    assert "repeat_kv" in table and "Greedy tokens, eager against compiled" in table
    assert result["parts"]["sampler"]["methods"].keys() == s["methods"].keys()


def test_killed_run_keeps_the_finished_parts_and_skips_parts_over_budget(tmp_path):
    """GPU_CHECK_KILL_AFTER=generators: the process SIGKILLs itself once that part is written. The
    files then hold every part up to it; the sampler, whose budget (300 s) is over the 200 s total,
    is skipped without running."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", gpu_check.KILL_AFTER_ENV: "generators"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path),
                          "--budget-s", "200", "--skip", "tests"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not data["finished"] and list(data["parts"]) == ["attention", "sampler", "generators"]
    assert data["parts"]["attention"]["status"] == data["parts"]["generators"]["status"] == "passed"
    assert data["parts"]["sampler"]["status"] == "skipped: budget" and "wall_s" not in data["parts"]["sampler"]
    assert set(data["parts"]["generators"]["per_prompt_over_shared"]) == {"eager"}  # nothing compiled
    table = (tmp_path / "gpu_check.md").read_text()
    assert "UNFINISHED" in table and "| sampler | skipped: budget |" in table and "| generators | passed |" in table
    assert "== generators: budget 60 s" in res.stdout and "generators: passed in" in res.stdout
    assert not list(tmp_path.glob(".gpu_check.*"))  # no temporary file left behind


# ----------------------------------------------------------------------------- the tests part


def test_pytest_status_never_calls_a_run_without_tests_passed():
    assert gpu_check.pytest_status(5, {})[0] == "not run"  # no test collected or all deselected
    assert gpu_check.pytest_status(0, {"passed": 0, "skipped": 10}) == ("not run", "0 tests ran: 10 skipped")
    assert gpu_check.pytest_status(0, {"passed": 3, "skipped": 2}) == ("passed", "")
    assert gpu_check.pytest_status(1, {"passed": 2, "failed": 1})[0] == "failed"
    assert gpu_check.pytest_status(0, {"passed": 2, "errors": 1})[0] == "failed"
    assert gpu_check.pytest_status(2, {"passed": 2})[0] == "failed"  # interrupted
    assert "usage error" in gpu_check.pytest_status(4, {})[1]
    status, reason = gpu_check.pytest_status(-9, {"passed": 4}, timed_out=True)
    assert status == "timed out" and "4 passed" in reason


def test_parse_pytest_output():
    summary = gpu_check.parse_pytest_summary
    assert summary("x\n======= 10 skipped in 2.31s =======\n")["skipped"] == 10
    assert summary("3 passed, 1 error, 2 warnings in 1.02s") == {**dict.fromkeys(gpu_check.PYTEST_OUTCOMES, 0),
                                                                "passed": 3, "errors": 1}
    assert summary("=== no tests ran in 0.01s ===") == dict.fromkeys(gpu_check.PYTEST_OUTCOMES, 0)
    assert summary("collecting ... \nKilled") is None
    verbose = gpu_check.parse_pytest_verbose(
        "tests/test_a.py::test_x PASSED [ 25%]\ntests/test_a.py::test_y[grpo] FAILED [ 50%]\n"
        "tests/test_a.py::test_z SKIPPED (needs a CUDA GPU) [ 75%]\ntests/test_a.py::test_w ")
    assert (verbose["passed"], verbose["failed"], verbose["skipped"]) == (
        ["tests/test_a.py::test_x"], ["tests/test_a.py::test_y[grpo]"], ["tests/test_a.py::test_z"])


def _fake_root(tmp_path, monkeypatch, body: str) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(body)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)


def test_tests_part_with_no_test_selected_is_not_run(tmp_path, monkeypatch):
    """A real pytest run that selects nothing (exit code 5) is "not run"."""
    _fake_root(tmp_path, monkeypatch, "import pytest  # pytest.mark.cuda is used nowhere\n\n"
                                      "def test_cpu():\n    pass\n")
    cfg = gpu_check.parse_config(gpu_check.GPUCheckConfig, ["--tiny", "--out", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()
    r = gpu_check.run_tests(cfg, tmp_path / "out", 120)
    assert r["returncode"] == 5 and r["status"] == "not run" and r["passed"] == 0


def test_tests_part_cut_off_by_its_time_limit_reports_what_finished(tmp_path, monkeypatch):
    _fake_root(tmp_path, monkeypatch, "import time\n\nimport pytest\n\npytestmark = pytest.mark.cuda\n\n"
                                      "def test_quick():\n    pass\n\n"
                                      "def test_slow():\n    time.sleep(120)\n")
    cfg = gpu_check.parse_config(gpu_check.GPUCheckConfig, ["--tiny", "--out", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()
    r = gpu_check.run_tests(cfg, tmp_path / "out", 15)
    assert r["status"] == "timed out" and r["passed"] == 1 and r["failed"] == 0 and "1 passed" in r["reason"]


# ----------------------------------------------------------------------------- eager against compiled


def test_compare_decodes_accepts_only_near_ties():
    eager = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    compiled = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 9], [5, 0, 7, 8], [5, 6, 7, 0], [1, 2, 4, 3]])
    eager_len = torch.tensor([4, 4, 4, 4, 4])
    compiled_len = torch.tensor([4, 4, 4, 3, 4])  # row 3 ends one token early
    asked = {}

    def eager_logits_at(rows, steps):
        asked["rows"], asked["steps"] = rows.tolist(), steps.tolist()
        logits = torch.zeros(len(rows), 10)
        logits[0, 3], logits[0, 9] = 2.0, 1.99   # row 1, step 2: gap 0.005 of 2.0 -> a near tie
        logits[1, 6], logits[1, 0] = 2.0, 1.0    # row 2, step 1: gap of half the logit -> a mismatch
        logits[2, 3], logits[2, 4] = -1.0, -0.9  # row 4, step 2: recomputed logits prefer c -> a tie too
        return logits

    logp_e = torch.zeros(5, 4)
    logp_c = torch.zeros(5, 4)
    logp_c[0, 0] = 1e-3  # before any difference: counted
    logp_c[1, 3] = 0.5   # after row 1's first difference: not counted
    r = gpu_check.compare_decodes(eager, compiled, eager_len, compiled_len, eager_logits_at, 0.01, logp_e, logp_c)
    assert asked == {"rows": [1, 2, 4], "steps": [2, 1, 2]}  # row 3 has no compiled token at step 3
    assert (r["rows"], r["identical"], r["near_tie"], r["mismatch"]) == (5, 1, 2, 2)
    by_row = {d["row"]: d for d in r["divergences"]}
    assert by_row[1]["near_tie"] and by_row[1]["gap_rel"] == pytest.approx(0.005)
    assert (by_row[1]["eager_token"], by_row[1]["compiled_token"]) == (3, 9)
    assert not by_row[2]["near_tie"] and by_row[2]["gap"] == pytest.approx(1.0)
    assert not by_row[3]["near_tie"] and by_row[3]["step"] == 3 and by_row[3]["gap"] is None
    assert by_row[4]["near_tie"] and by_row[4]["gap"] == pytest.approx(-0.1)
    assert r["max_abs_logprob_diff"] == pytest.approx(1e-3) and r["tolerance_rel"] == 0.01
    # a tighter tolerance turns row 1 into a mismatch; identical decodes ask for no logits
    assert gpu_check.compare_decodes(eager, compiled, eager_len, compiled_len, eager_logits_at, 1e-3)["mismatch"] == 3
    same = gpu_check.compare_decodes(eager, eager, eager_len, eager_len, None, 1e-3)
    assert (same["identical"], same["divergences"]) == (5, [])


def test_default_tie_tolerance_by_dtype():
    assert gpu_check.default_tie_rtol(torch.bfloat16) == 2**-5
    assert gpu_check.default_tie_rtol(torch.float32) == 1e-5
    cfg = gpu_check.parse_config(gpu_check.GPUCheckConfig, ["--tiny", "--dtype", "bfloat16"])
    assert cfg.tie_rtol == 2**-5 and cfg.budget_s == gpu_check.TINY_TOTAL_BUDGET_S


# ----------------------------------------------------------------------------- attention


def test_gqa_path_from_the_shapes_sdpa_got():
    path = gpu_check.gqa_path
    assert path((4, 14, 1, 64), (4, 2, 700, 64), True, 14, 2) == "enable_gqa"
    assert path((4, 2, 7, 64), (4, 2, 700, 64), False, 14, 2) == "pack_gqa"
    assert path((4, 14, 1, 64), (4, 14, 768, 64), False, 14, 2) == "repeat_kv"
    assert path((4, 14, 512, 64), (4, 14, 512, 64), False, 14, 2) == "repeat_kv"  # a padded prefill
    assert path((4, 8, 1, 64), (4, 8, 9, 64), False, 8, 8) == "mha"


def test_decode_bytes_per_token_by_hand():
    """Qwen2.5-0.5B shapes in bf16 (24 layers, 2 K/V heads of 64 dims, 14 query heads), 384 rows at
    context 640: 24 * 2 * 2 * 64 * 2 = 12,288 B per cached position, 7x that when K/V are repeated."""
    config = SimpleNamespace(num_hidden_layers=24, num_key_value_heads=2, num_attention_heads=14, hidden_size=896)
    b = gpu_check.decode_bytes_per_token(config, 494_000_000, 2, rows=384, context=640)
    assert b["kv_per_position"] == 12_288 and b["n_rep"] == 7
    assert b["weights"] == pytest.approx(494e6 * 2 / 384) and b["kv"] == 12_288 * 640
    assert b["total_repeated"] == pytest.approx(b["weights"] + 7 * 12_288 * 640)


def test_torchrun_part_runs_only_when_the_trainer_sets_up_torch_distributed(tmp_path, monkeypatch):
    (tmp_path / "rankgrpo").mkdir()
    (tmp_path / "rankgrpo" / "training.py").write_text("import torch\n")
    (tmp_path / "train_rankgrpo.py").write_text("def main(): pass\n")
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    supported, why = gpu_check.trainers_support_distributed()
    assert not supported and "init_process_group" in why
    (tmp_path / "rankgrpo" / "training.py").write_text("torch.distributed.init_process_group('nccl')\n")
    assert gpu_check.trainers_support_distributed() == (True, "")


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit, match="parts are"):
        gpu_check.main(["--tiny", "--skip", "everything"])


def test_torchrun_part_matches_the_trainers(tmp_path):
    """The real trainers set up torch.distributed, so on two GPUs the part runs; its command lines
    parse with train_rankgrpo.py's own config (flags that exist, prompts that split over 2
    processes) and cover DDP and FSDP2."""
    from rankgrpo.config import parse_config

    sys.path.insert(0, str(ROOT))
    import train_rankgrpo

    assert gpu_check.trainers_support_distributed() == (True, "")
    runs = gpu_check.torchrun_runs(tmp_path / "world")
    assert set(runs) == {"one_process", "torchrun_2_ddp", "torchrun_2_fsdp"}
    for name, (cmd, tol) in runs.items():
        script = cmd.index("train_rankgrpo.py")
        launcher = cmd[1:script]
        if name == "one_process":
            assert launcher == [] and tol is None
        else:
            assert launcher[:2] == ["-m", "torch.distributed.run"] and "--standalone" in launcher
            assert launcher[launcher.index("--nproc-per-node") + 1] == "2" and 0 < tol <= 1e-4
        cfg = parse_config(train_rankgrpo.TrainRankGRPOConfig, [*cmd[script + 1:], "--out", str(tmp_path / name)])
        assert cfg.fsdp == (name == "torchrun_2_fsdp") and cfg.device == "cuda"
        assert cfg.prompts_per_step % 2 == 0 and cfg.eval_every == 0 and not cfg.bf16
