"""Data parallelism under torchrun (gloo on CPU): two processes train exactly like one process on
the same global batch (DDP and FSDP2), rollouts do not depend on the world size, a run whose rank
is killed resumes to the weights of an uninterrupted run, and evaluate.py gathers the same lists.

The tests that start processes (torchrun, 2 ranks) are marked slow; each start costs the import
of torch and transformers twice."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers import TINY
from test_pipeline import ENV, ROOT, rl_args, sft_args, world  # noqa: F401  (world is a fixture)

from rankgrpo.catalog import load_catalog
from rankgrpo.counter_rng import PromptKeys
from rankgrpo.data import load_examples, write_examples
from rankgrpo.distributed import World, check_resumable, prompt_keys
from rankgrpo.models import tiny_model
from rankgrpo.sampling import sample

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_in_process(script: str, *args) -> int:
    """One process, no torchrun: the script's main() in this interpreter (saves a start-up); its status."""
    name = f"_in_process_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args])


def in_process(script: str, *args) -> None:
    assert run_in_process(script, *args) == 0


def torchrun(script: str, *args, timeout=400) -> None:
    res = subprocess.run([*TORCHRUN, str(ROOT / script), *map(str, args)], env=ENV, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]


def final_weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def log_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if '"loss"' in line]


# ----------------------------------------------------------------------------- fast: no processes


def test_shard_splits_evenly_or_says_why():
    assert World(rank=0, size=2).shard(range(6)) == [0, 1, 2]
    assert World(rank=1, size=2).shard(range(6)) == [3, 4, 5]
    assert World().shard([7, 8]) == [7, 8]
    with pytest.raises(ValueError, match="5 prompts do not split evenly over 2 processes"):
        World(rank=0, size=2).shard(range(5), "prompts")


def test_prompt_keys_depend_on_seed_step_and_position_only():
    def draws(seed, step, j):
        return prompt_keys(seed, step, [j], "cpu").draws(2, 3)

    assert torch.equal(draws(1, 2, 3), draws(1, 2, 3))
    assert torch.equal(prompt_keys(1, 2, [5, 3, 4], "cpu").keys[1:2], prompt_keys(1, 2, [3], "cpu").keys)
    others = [draws(*key) for key in [(1, 2, 4), (1, 3, 3), (2, 2, 3), (2, 1, 3), (1, 3, 2)]]
    assert all(not torch.isin(draws(1, 2, 3), d).any() for d in others)  # no draw shared with another key
    assert isinstance(prompt_keys(1, 2, range(4), "cpu"), PromptKeys) and len(prompt_keys(1, 2, range(4), "cpu")) == 4


def test_a_prompts_group_is_the_same_in_any_batch():
    """Rank 0 of 1 samples prompts [0, 1, 2, 3]; rank 1 of 2 samples [2, 3]: same rows for 2 and 3."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=64)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    kw = dict(group_size=3, max_new_tokens=12, eos_token_ids=[1], pad_token_id=0)
    whole = sample(model, prompts, generator=prompt_keys(7, 5, range(4), "cpu"), **kw)
    half = sample(model, prompts[2:], generator=prompt_keys(7, 5, [2, 3], "cpu"), **kw)
    T = int(half.lengths.max())
    assert torch.equal(whole.lengths[6:], half.lengths)
    assert torch.equal(whole.completion_ids[6:, :T], half.completion_ids)
    assert torch.allclose(whole.logprobs[6:, :T], half.logprobs, atol=1e-5)
    again = sample(model, prompts, generator=prompt_keys(7, 5, range(4), "cpu"), **kw)  # same seed, same rollout
    assert torch.equal(again.completion_ids, whole.completion_ids) and torch.equal(again.logprobs, whole.logprobs)
    other = sample(model, prompts, generator=prompt_keys(7, 6, range(4), "cpu"), **kw)  # the next step draws anew
    assert not torch.equal(other.completion_ids[:, :4], whole.completion_ids[:, :4])
    # one shared generator, as before: the second half's draws depend on what is sampled beside it
    shared = sample(model, prompts[2:], generator=torch.Generator().manual_seed(7), **kw)
    shared_whole = sample(model, prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert not torch.equal(shared_whole.completion_ids[6:, :int(shared.lengths.max())], shared.completion_ids)
    with pytest.raises(ValueError, match="3 prompt keys for 4 prompts"):
        sample(model, prompts, generator=prompt_keys(7, 5, range(3), "cpu"), **kw)
    with pytest.raises(TypeError, match="torch.Generator, PromptKeys or None"):
        sample(model, prompts, generator=[torch.Generator().manual_seed(p) for p in range(4)], **kw)


def test_resume_needs_the_same_world_size_and_mode():
    check_resumable({"world_size": 2, "parallel_mode": "replicated"}, World(rank=0, size=2, mode="ddp"), "ck")
    check_resumable({}, World(), "ck")  # a checkpoint written before data parallelism: one process
    with pytest.raises(SystemExit, match="ck was written by 2 process.es., this run has 1; .*--nproc-per-node 2"):
        check_resumable({"world_size": 2, "parallel_mode": "replicated"}, World(), "ck")
    with pytest.raises(SystemExit, match="written with --fsdp"):
        check_resumable({"world_size": 2, "parallel_mode": "fsdp"}, World(rank=0, size=2, mode="ddp"), "ck")


def test_fsdp_outside_torchrun_is_a_clear_error():
    from rankgrpo.distributed import init_world
    with pytest.raises(SystemExit, match="--fsdp .* torchrun"):
        init_world("cpu", fsdp=True)


# ----------------------------------------------------------------------------- torchrun, 2 processes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sft_two_processes_equal_one(world, tmp_path, mode):  # noqa: F811
    # 2 micro-batches of 2 per rank (accumulation without sync, then one summed all-reduce) against
    # 4 micro-batches of 2 in one process; the loss is divided by the global target-token count.
    # Under DDP every micro-batch runs its shared prompt prefix as a separate forward pass
    # (--share-prompt-prefix), which the gradient hooks must survive; FSDP2 runs whole rows, so the
    # process it is held against does too (test_shared_prefix.py proves the two layouts equal)
    args = lambda out: [*sft_args(world, out, 3), "--micro-batch-size", 2, "--grad-accum", 4]  # noqa: E731
    in_process("train_sft.py", *args(tmp_path / "one"), *(["--no-share-prompt-prefix"] if mode == "fsdp" else []))
    torchrun("train_sft.py", *args(tmp_path / "ddp"), *(["--fsdp"] if mode == "fsdp" else []))
    one, ddp = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")
    base = load_file(str(world / "base_model" / "model.safetensors"))
    assert max_abs_diff(one, base) > 1e-3  # the steps did move the weights
    assert max_abs_diff(one, ddp) <= 1e-5
    # AdamW and clipping hide a wrong gradient scale in the weights; the logged global loss and
    # gradient norm do not
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in log_rows(tmp_path / "ddp")] == pytest.approx(
            [r[key] for r in log_rows(tmp_path / "one")], rel=1e-4), key
    # the validation loss and greedy metrics, each rank scoring its share: the global figures
    (x,), (y,) = validation_rows(tmp_path / "one"), validation_rows(tmp_path / "ddp")
    assert x.keys() == y.keys() and y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5)
    assert all(y[k] == x[k] for k in x if k.startswith("val_") and k != "val_loss")


@pytest.fixture(scope="module")
def sft_model(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("sft")
    in_process("train_sft.py", *sft_args(world, out, 60))
    return out / "final"


def rl(world, model, out, aggregation, steps):  # noqa: F811
    # 4 prompts x G = 4: 16 rows; micro-batches of 4 rows (4 per step in one process, 2 per rank)
    # validation at step 0 and at the end: each rank generates for half of the prompts
    return rl_args(world, model, out, steps, prompts_per_step=4, group_size=4, micro_batch_size=4, mu=2,
                   beta=0.05, aggregation=aggregation, max_new_tokens=48, save_every=1, eval_every=steps)


def validation_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if '"val_' in line]


def same_rollouts_and_global_means(a, b):
    ra, rb = log_rows(a), log_rows(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        # entropy is a token mean and dcg_std a standard deviation over all lists: global values,
        # not means of the two ranks' values (which differ from these)
        for key in ("reward/rank_mean", "completion_tokens", "items_emitted", "ended_with_eos", "loss", "kl",
                    "entropy", "reward/dcg_std"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), key
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)  # the gradient's scale (Adam hides it)
    # validation split over the ranks and gathered: the same figures as one process validating all
    va, vb = validation_rows(a), validation_rows(b)
    assert len(va) == len(vb) == 2
    for x, y in zip(va, vb):
        assert x.keys() == y.keys() and all(y[k] == pytest.approx(x[k], abs=1e-12) for k in x)


@pytest.mark.slow
def test_rl_token_mean_ddp_equals_one_process(world, sft_model, tmp_path):  # noqa: F811
    in_process("train_rankgrpo.py", *rl(world, sft_model, tmp_path / "one", "token_mean", 2))
    torchrun("train_rankgrpo.py", *rl(world, sft_model, tmp_path / "ddp", "token_mean", 2))
    one, ddp = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")
    assert max_abs_diff(one, load_file(str(sft_model / "model.safetensors"))) > 1e-4
    assert max_abs_diff(one, ddp) <= 1e-5
    same_rollouts_and_global_means(tmp_path / "one", tmp_path / "ddp")
    assert any(r["reward/rank_1"] > 0 for r in log_rows(tmp_path / "one"))  # rewards, not only penalties


@pytest.mark.slow
def test_rl_authors_objective_ddp_equals_one_process(world, sft_model, tmp_path):  # noqa: F811
    # --objective authors: among its rules, micro_token_mean divides each micro-batch's token sum by
    # that micro-batch's own token count and averages the micro-batches, so the loss depends on which
    # rows share a micro-batch. The comparison is fair when both layouts cut the same micro-batches:
    # 16 rows in micro-batches of 4 are rows 0-3, 4-7, 8-11, 12-15 in one process, and the same four
    # when each of two processes owns 8 contiguous rows (whole groups) and cuts two; the count of
    # micro-batches (4) is summed over the processes. With 6 rows per micro-batch, one process would
    # cut 0-5, 6-11, 12-15 and two processes 0-5, 6-7 | 8-13, 14-15: other means, other weights.
    def args(out):
        return rl_args(world, sft_model, out, 2, prompts_per_step=4, group_size=4, micro_batch_size=4, mu=2,
                       beta=0.05, max_new_tokens=48, save_every=1, eval_every=2, objective="authors")

    in_process("train_rankgrpo.py", *args(tmp_path / "one"))
    torchrun("train_rankgrpo.py", *args(tmp_path / "ddp"))
    one, ddp = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")
    assert max_abs_diff(one, load_file(str(sft_model / "model.safetensors"))) > 1e-4
    assert max_abs_diff(one, ddp) <= 1e-5
    same_rollouts_and_global_means(tmp_path / "one", tmp_path / "ddp")
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert (config["aggregation"], config["overflow_ratio"], config["reward_matching"]) == \
        ("micro_token_mean", "shared", "parsed_list")


def mention_learned_films(world, name):  # noqa: F811
    """The examples of `name`, each "mentioning" one of the four learned films that are not its
    ground truth, a different one by example (what --constrained excludes by default)."""
    films = [(it.title, it.year) for it in list(load_catalog(world / "catalog.jsonl"))[:5]]
    examples = load_examples(world / name)
    for k, e in enumerate(examples):
        e.seen_titles = [films[1 + k % 4][0]]
    return examples


@pytest.mark.slow
def test_rl_constrained_ddp_equals_one_process(world, sft_model, tmp_path):  # noqa: F811
    # each rank builds the constraint of its own prompts (their seen titles excluded) and aligns it
    # with its local rollout's prompt_index: the same rollouts, log-probs and weights as one process.
    # Every conversation "mentions" one of the five films SFT learned, a different one by example,
    # so a rank that used another prompt's exclusions would sample (and score) other lists.
    write_examples(tmp_path / "train.jsonl", mention_learned_films(world, "easy_train.jsonl"))

    def args(out):
        a = rl(world, sft_model, out, "rank_mean", 1)
        a[a.index("--data") + 1] = tmp_path / "train.jsonl"
        return [*a, "--constrained"]

    in_process("train_rankgrpo.py", *args(tmp_path / "one"))
    torchrun("train_rankgrpo.py", *args(tmp_path / "ddp"))
    assert max_abs_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")) <= 1e-5
    same_rollouts_and_global_means(tmp_path / "one", tmp_path / "ddp")
    for run in ("one", "ddp"):
        assert all(r["in_catalog"] == 1.0 for r in log_rows(tmp_path / run))


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (a child of the launcher)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == launcher_pid and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_rl_rank_mean_fsdp_equals_one_process_and_resumes_after_sigkill(world, sft_model, tmp_path, capsys):  # noqa: F811
    args = lambda out: rl(world, sft_model, out, "rank_mean", 3)  # noqa: E731
    in_process("train_rankgrpo.py", *args(tmp_path / "one"))
    torchrun("train_rankgrpo.py", *args(tmp_path / "fsdp"), "--fsdp")
    one, fsdp = final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp")
    assert max_abs_diff(one, fsdp) <= 1e-5
    same_rollouts_and_global_means(tmp_path / "one", tmp_path / "fsdp")
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000003"
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt", "trainer_state.pt"} <= {p.name for p in ckpt.iterdir()}
    config = json.loads((tmp_path / "fsdp" / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # loads in plain transformers, not FSDP's subclass

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*TORCHRUN, str(ROOT / "train_rankgrpo.py"), *map(str, args(killed)), "--fsdp"],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not (killed / "checkpoints" / "step-000001" / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0 and not (killed / "final").exists()
    torchrun("train_rankgrpo.py", *args(killed), "--fsdp", "--resume")
    resumed = final_weights(killed)
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp)
    assert [r["step"] for r in log_rows(killed)] == [1, 1, 2, 2, 3, 3]  # mu = 2 rows per step, none twice

    # a checkpoint of 2 processes does not resume in 1: one line naming the fix, exit status 2
    capsys.readouterr()
    assert run_in_process("train_rankgrpo.py", *args(killed), "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "written by 2 process" in err and "--nproc-per-node 2" in err


@pytest.mark.slow
@pytest.mark.parametrize("constrained", [False, True], ids=["plain", "constrained"])
def test_evaluate_under_torchrun_gathers_the_same_lists(world, sft_model, tmp_path, constrained):  # noqa: F811
    data = world / "easy_validation.jsonl"
    if constrained:  # each rank builds the exclusion sets of the examples it generates for
        data = tmp_path / "validation.jsonl"
        write_examples(data, mention_learned_films(world, "easy_validation.jsonl"))
    args = ["--model", sft_model, "--data", data, "--catalog", world / "catalog.jsonl",
            "--max-new-tokens", 48, "--n-items", 5, "--batch-size", 3, *(["--constrained"] if constrained else [])]
    in_process("evaluate.py", *args, "--out", tmp_path / "one")
    torchrun("evaluate.py", *args, "--out", tmp_path / "two")
    a, b = ((tmp_path / d / "examples.jsonl").read_text() for d in ("one", "two"))
    assert a == b and len(a.splitlines()) == TINY.n_validation
    if constrained:
        results = json.loads((tmp_path / "two" / "results.json").read_text())["results"]
        assert results["in_catalog"]["mean"] == 1.0
