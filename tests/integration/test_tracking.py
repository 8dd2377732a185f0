"""--report-to: the trainers send the rows of RUN/log.jsonl, under the same names, to TensorBoard (event
files read back with TensorBoard's own reader) or wandb (offline mode: the run directory it writes);
a missing package is one error line that names the extra; under torchrun only rank 0 reports.

The TensorBoard and wandb tests are skipped when their package is not installed
(pip install 'rankgrpo[tensorboard]' / 'rankgrpo[wandb]'; `make test` installs both)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import ENV, ROOT, rl_args, sft_args, world  # noqa: F401  (world is a fixture)
from test_distributed import run_in_process

from rankgrpo.tracking import MetricLog, NoTracker, check_tracker_installed, scalars

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def sft(world, out, *flags):  # noqa: F811
    return [*sft_args(world, out, 2), "--micro-batch-size", 2, "--grad-accum", 2, "--eval-every", 1,
            "--val-gen-examples", 2, "--max-new-tokens", 16, *flags]


def rl(world, out, *flags):  # noqa: F811
    return [*rl_args(world, world / "base_model", out, 2, prompts_per_step=2, group_size=2, micro_batch_size=4,
                     max_new_tokens=16, mu=2, eval_every=2, val_examples=2), *flags]


def jsonl(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir):
    """(tag -> [(step, value)], the EventAccumulator) of the run's one event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def expected_scalars(rows) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for row in rows:
        for k, v in scalars(row).items():
            if k != "step":
                out.setdefault(k, []).append((row["step"], v))
    return out


# ----------------------------------------------------------------------------- no package needed


def test_scalars_are_the_rows_numbers_under_their_names(tmp_path):
    row = {"step": 2, "iteration": 1, "loss": 0.25, "reward/rank_1": 0.5, "reward/rank_mean": [0.5, 0.0],
           "lr": 1e-6, "samples_per_s": 12.5, "flag": True, "note": "x"}
    assert scalars(row) == {"step": 2.0, "iteration": 1.0, "loss": 0.25, "reward/rank_1": 0.5, "lr": 1e-6,
                            "samples_per_s": 12.5}

    class Recorder(NoTracker):
        rows: list = []

        def log(self, row):
            self.rows.append(row)

    log = MetricLog(tmp_path / "log.jsonl", Recorder())
    log.append(row)
    assert jsonl(tmp_path) == [row] and Recorder.rows == [row]  # the same row to both


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_error_line(world, tmp_path, capsys, monkeypatch, tracker):  # noqa: F811
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    assert run_in_process("train_sft.py", *sft(world, tmp_path / "o", "--report-to", tracker)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: --report-to {tracker} needs the {tracker} package, which is not installed: "
                   f"pip install 'rankgrpo[{tracker}]'"]
    assert not (tmp_path / "o").exists()  # refused before any work
    check_tracker_installed("none")


# ----------------------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize("script", ["train_sft.py", "train_rankgrpo.py"])
def test_tensorboard_gets_the_jsonl_rows(world, tmp_path, script):  # noqa: F811
    pytest.importorskip("tensorboard", reason="pip install 'rankgrpo[tensorboard]'")
    args = sft if script == "train_sft.py" else rl
    assert run_in_process(script, *args(world, tmp_path / "run", "--report-to", "tensorboard")) == 0
    got, acc = tensorboard_scalars(tmp_path / "run")
    rows = jsonl(tmp_path / "run")
    want = expected_scalars(rows)
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag
    names = set(want)
    if script == "train_rankgrpo.py":  # per-rank rewards, KL, clip fractions, lr, samples/s, validation
        assert {"reward/rank_1", "kl", "lr", "samples_per_s", "val_ndcg@20"} <= names
        assert any(n.startswith("clip") for n in names), names
    else:
        assert {"loss", "lr", "val_loss"} <= names
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == config


@pytest.mark.slow
def test_only_rank_0_reports(world, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="pip install 'rankgrpo[tensorboard]'")
    res = subprocess.run([*TORCHRUN, str(ROOT / "train_sft.py"),
                          *map(str, sft(world, tmp_path / "run", "--report-to", "tensorboard", "--lora-rank", 4))],
                         env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got, _ = tensorboard_scalars(tmp_path / "run")  # one event file: rank 0's
    assert got.keys() == expected_scalars(jsonl(tmp_path / "run")).keys()


# ----------------------------------------------------------------------------- wandb, offline


def test_wandb_offline_writes_its_run(world, tmp_path):  # noqa: F811
    pytest.importorskip("wandb", reason="pip install 'rankgrpo[wandb]'")
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "train_rankgrpo.py"),
                          *map(str, rl(world, tmp_path / "run", "--report-to", "wandb"))],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    history = list(runs[0].glob("run-*.wandb"))  # the run's records, what `wandb sync` uploads
    assert len(history) == 1
    # wandb ships no reader for the offline records; their protobuf strings hold the metric and config names
    data = history[0].read_bytes()
    names = {k for row in jsonl(tmp_path / "run") for k in scalars(row)}
    assert {"loss", "kl", "reward/rank_1", "lr", "samples_per_s", "val_ndcg@20"} <= names
    assert [n for n in names if n.encode() not in data] == []
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [k for k in config if k.encode() not in data] == []
