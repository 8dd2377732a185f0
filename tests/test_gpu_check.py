"""benchmarks/gpu_check.py: the decode bound by hand, the peak table, and the whole check in its
--tiny form on the CPU (the same code path a GPU run takes, with tiny shapes)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


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
    assert data["parts"].keys() == set(gpu_check.PARTS)
    tests = data["parts"]["tests"]  # collected without a GPU: every one skipped, none failed
    assert tests["status"] == "passed" and tests["tests"] >= 1 and tests["skipped"] == tests["tests"]
    assert "tests/test_cuda.py" in tests["files"]

    s = data["parts"]["sampler"]
    assert s["status"] == "passed" and s["rows"] == 8
    for name in ("sample", "sample_compiled", "generate"):
        m = s["methods"][name]
        assert m["tokens"] == 8 * 24 and m["tokens_per_s"] > 0 and 0 < m["share_of_bound"] < 1
        assert m["vs_generate"] == pytest.approx(m["tokens_per_s"] / s["methods"]["generate"]["tokens_per_s"])
    assert s["compiled_decode_stats"]["graphs_compiled"] == 0, "the timed shapes were compiled in the warm-up"
    assert s["bound"]["tokens_per_s"] > 0 and math.isfinite(s["compiled_vs_eager"])

    rl = data["parts"]["rl_step"]
    assert rl["status"] == "passed" and rl["completions"] == 16 and rl["samples_per_s"] > 0
    assert set(rl["stage_seconds"]) >= {"sample", "score", "reference", "update", "step"}
    assert data["parts"]["torchrun"]["status"] == "skipped" and "GPU" in data["parts"]["torchrun"]["reason"]

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| sample_compiled |" in table and "| update |" in table and "Decode bound" in table
    assert result["parts"]["sampler"]["methods"].keys() == s["methods"].keys()


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
