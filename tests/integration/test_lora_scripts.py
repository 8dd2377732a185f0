"""Both trainers with --lora-rank on a tiny sandbox world: final/ holds merged weights that load
in plain transformers under the base's keys, final/adapter/ the adapter; only the adapters train
and enter the optimizer; the KL reference is the starting model; --resume is exact; a checkpoint
resumes only the way it was written; two processes (DDP) train like one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import ENV, ROOT, rl_args, sft_args, world  # noqa: F401  (world is a fixture)
from test_distributed import in_process, max_abs_diff, run_in_process, sft_model  # noqa: F401  (a fixture)

from rankgrpo.lora import DEFAULT_TARGETS, LoRASettings, add_lora, load_adapter
from rankgrpo.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
LORA = ["--lora-rank", 8, "--lora-alpha", 16]


def sft(world, out, steps, *flags):  # noqa: F811
    return [*sft_args(world, out, steps), "--micro-batch-size", 2, "--grad-accum", 2, "--save-every", 1, *LORA,
            *flags]


def rl(world, model, out, steps, *flags):  # noqa: F811
    return [*rl_args(world, model, out, steps, prompts_per_step=2, group_size=4, micro_batch_size=4, mu=2,
                     beta=0.05, max_new_tokens=32, save_every=1, lr=3e-2), *LORA, *flags]


def weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def log_rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines() if '"loss"' in x]


def test_sft_with_lora_end_to_end(world, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    base_dir = world / "base_model"
    in_process("train_sft.py", *sft(world, tmp_path / "sft", 3))
    final = tmp_path / "sft" / "final"
    base, merged = weights(base_dir), weights(final)
    assert merged.keys() == base.keys()  # the base's own names: plain transformers loads it
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in DEFAULT_TARGETS for k in changed), changed  # only adapted W
    plain = AutoModelForCausalLM.from_pretrained(final).eval()
    # the merged weights compute what the base with the saved adapter computes
    adapted = load_model(base_dir)
    add_lora(adapted, LoRASettings(8, 16.0, 0.0, DEFAULT_TARGETS, str(base_dir)))
    load_adapter(adapted, final / "adapter")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 8, str(base_dir))
    # only the 2 x 14 adapter matrices entered the optimizer
    state = torch.load(tmp_path / "sft" / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(state["optimizer"]["state"]) == 2 * 14


def test_rl_with_lora_end_to_end(world, sft_model, tmp_path):  # noqa: F811
    """Rank-GRPO with LoRA from an SFT model whose lists hold the planted films (rewards to follow)."""
    from transformers import AutoModelForCausalLM

    in_process("train_rankgrpo.py", *rl(world, sft_model, tmp_path / "rl", 2))
    rows = log_rows(tmp_path / "rl")
    # the reference is the starting model: KL 0 before the first update, > 0 once the adapters moved,
    # also on the first pass of the second round (a reference taken from the current weights gives 0 there)
    assert rows[0]["iteration"] == 0 and rows[0]["kl"] == 0 and rows[0]["grad_norm"] > 0
    second = [r for r in rows if r["step"] == 2 and r["iteration"] == 0]
    assert len(second) == 1 and second[0]["kl"] > 0
    start, final = weights(sft_model), weights(tmp_path / "rl" / "final")
    assert final.keys() == start.keys() and max_abs_diff(final, start) > 1e-4
    AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "final")
    state = torch.load(tmp_path / "rl" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == 2 * 14


@pytest.mark.parametrize("trainer", ["sft", "rl"])
def test_lora_resume_is_exact(world, sft_model, tmp_path, trainer):  # noqa: F811
    """Two steps straight against one step, then --resume for the second: the same adapters and merged
    weights bit for bit (adapter dropout on, so the restored RNG matters)."""
    script = "train_sft.py" if trainer == "sft" else "train_rankgrpo.py"

    def args(out, steps):
        if trainer == "sft":
            return sft(world, out, steps, "--lora-dropout", 0.1)
        return rl(world, sft_model, out, steps, "--lora-dropout", 0.1)

    in_process(script, *args(tmp_path / "straight", 2))
    in_process(script, *args(tmp_path / "resumed", 1))
    in_process(script, *args(tmp_path / "resumed", 2), "--resume")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a = load_file(str(tmp_path / "straight" / "final" / name))
        b = load_file(str(tmp_path / "resumed" / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    start = weights(world / "base_model" if trainer == "sft" else sft_model)
    assert max_abs_diff(weights(tmp_path / "straight" / "final"), start) > 1e-4  # the adapters did move
    assert [r["loss"] for r in log_rows(tmp_path / "resumed")] == [r["loss"] for r in log_rows(tmp_path / "straight")]


def test_a_checkpoint_resumes_only_the_way_it_was_written(world, tmp_path, capsys):  # noqa: F811
    in_process("train_sft.py", *sft(world, tmp_path / "lora", 1))
    args = [str(a) for a in sft(world, tmp_path / "lora", 2)]
    assert run_in_process("train_sft.py", *args[:args.index("--lora-rank")], "--resume") == 2
    assert run_in_process("train_sft.py", *args, "--lora-rank", 4, "--resume") == 2
    in_process("train_sft.py", *sft_args(world, tmp_path / "full", 1))
    assert run_in_process("train_sft.py", *sft(world, tmp_path / "full", 2), "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 3
    assert "was written with --lora-rank; resume it the same way" in err[0]
    assert "was written with --lora-rank 8, this run has 4" in err[1]
    assert "was written without --lora-rank" in err[2]


@pytest.mark.slow
def test_lora_ddp_equals_one_process(world, sft_model, tmp_path):  # noqa: F811
    """SFT (gradient accumulation, summed all-reduce of the adapters' gradients) and Rank-GRPO (mu = 2, the
    KL reference with the adapters off on each rank): two processes against one."""
    for script, args, start in (("train_sft.py", lambda out: sft(world, out, 3), world / "base_model"),
                                ("train_rankgrpo.py", lambda out: rl(world, sft_model, out, 2), sft_model)):
        run = Path(script).stem
        in_process(script, *args(tmp_path / run / "one"))
        res = subprocess.run([*TORCHRUN, str(ROOT / script), *map(str, args(tmp_path / run / "ddp"))], env=ENV,
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        one, ddp = weights(tmp_path / run / "one" / "final"), weights(tmp_path / run / "ddp" / "final")
        assert max_abs_diff(one, weights(start)) > 1e-4, script
        assert max_abs_diff(one, ddp) <= 1e-5, script
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in log_rows(tmp_path / run / "ddp")] == pytest.approx(
                [r[key] for r in log_rows(tmp_path / run / "one")], rel=1e-4, abs=1e-7), (script, key)
