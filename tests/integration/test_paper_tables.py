"""The paper-tables benchmark's bookkeeping: the stage graph, paired differences, verdicts,
smoothing and the per-round time breakdown (the training itself is tested elsewhere)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from rankgrpo.sandbox import settings
from rankgrpo.task_runner import record_seconds
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
pt = load_script(ROOT / "benchmarks" / "paper_tables.py")
SCRIPT_CONFIGS = {"train_sft": load_script(ROOT / "train_sft.py").TrainSFTConfig,
                  "train_rankgrpo": load_script(ROOT / "train_rankgrpo.py").TrainRankGRPOConfig,
                  "evaluate": load_script(ROOT / "evaluate.py").EvaluateConfig}


def _cfg(*argv):
    return pt.parse_config(pt.PaperTablesConfig, ["--out", "OUT", *argv])


def resolve(task):
    """The config a task's command resolves to in its script (parsed as the script would)."""
    script = next(i for i, x in enumerate(task.cmd) if x.endswith(".py"))
    cls = SCRIPT_CONFIGS[Path(task.cmd[script]).stem]
    return pt.parse_config(cls, task.cmd[script + 1:])


def evals_of(tasks):
    return [t.name[len("eval/"):] for t in tasks if t.name.startswith("eval/")]


def test_plan_is_a_dag_in_priority_order_with_equal_settings_for_every_arm():
    tasks = pt.plan(_cfg("--replicates", "0"))
    names = [t.name for t in tasks]
    assert len(names) == len(set(names))
    position = {n: i for i, n in enumerate(names)}
    for t in tasks:  # every dependency exists and comes earlier (so list order is a valid schedule)
        assert all(position[d] < position[t.name] for d in t.deps), t.name
    rl = [t for t in tasks if t.name.startswith("rl/")]
    assert len(rl) == 10

    def flag(t, f):
        return t.cmd[t.cmd.index(f) + 1]

    # every arm resolves (the script's sandbox preset + the task's flags) to equal steps, samples and seeds
    resolved = [resolve(t) for t in rl]
    for f in ["steps", "lr", "seed", "prompts_per_step", "group_size", "max_new_tokens", "beta", "stop_after_lines",
              "micro_batch_size"]:
        assert len({getattr(c, f) for c in resolved}) == 1, f
    assert {(c.algo, c.reward, c.mu) for c in resolved} == {(a.algo, a.reward, a.mu) for a in pt.RL_ARMS}
    # the arms trained under the no-repeat constraint differ from their on-policy twins by the decoding alone,
    # the one their no-repeat evaluation scores: no film twice, films the user named allowed
    for arm in ("grpo", "rank_grpo_exp_inf"):
        con, on = (next(resolve(t) for t in rl if t.name == f"rl/{kind}/{arm}") for kind in ("con", "on"))
        assert con.constrained and not on.constrained and not con.exclude_seen
        assert {k: v for k, v in vars(con).items() if k not in ("constrained", "exclude_seen", "out")} == \
            {k: v for k, v in vars(on).items() if k not in ("constrained", "exclude_seen", "out")}
    assert {flag(t, "--model") for t in rl if "r1zero" not in t.name} == {str(Path("OUT/sft/full/final"))}
    r1 = next(t for t in rl if "r1zero" in t.name)
    assert flag(r1, "--model") == str(Path("OUT/world/base_model"))
    mus = {t.name: flag(t, "--mu") for t in rl}
    assert mus["rl/off/gspo"] == "2" and mus["rl/on/grpo"] == "1"
    sft = [resolve(t) for t in tasks if t.name.startswith("sft/")]
    assert len({(c.max_steps, c.lr, c.seed, c.micro_batch_size) for c in sft}) == 1
    demos = {t.name: t.cmd for t in tasks if t.name.startswith("demos/")}
    assert "--no-reflect" in demos["demos/no_reflect"] and "--no-remap-reflect" in demos["demos/no_remap_reflect"]
    assert not {"--no-reflect", "--no-remap-reflect"} & set(demos["demos/full"])
    evals = {t.name: t.cmd for t in tasks if t.name.startswith("eval/")}
    # every RL and SFT arm, the base model; again without repeats every arm but R1-zero (from the base model)
    assert len(evals) == 10 + 3 + 1 + 9 + 3
    constrained = {n for n, cmd in evals.items() if "--constrained" in cmd}
    assert constrained == {f"eval/constrained/{n}" for n in evals_of(tasks)
                           if n != "base" and "r1zero" not in n and not n.startswith("constrained/")}
    for n in constrained:  # the same checkpoint as the plain evaluation, only the repeats banned
        plain = evals[n.replace("constrained/", "")]
        assert [x.replace("constrained/", "") for x in evals[n]] == plain + ["--constrained", "--no-exclude-seen"]
    assert len(evals_of(pt.plan(_cfg("--replicates", "0", "--no-constrained-eval")))) == 14


def test_every_stage_runs_the_sandbox_settings_plus_the_reports_curves_and_whole_test_split():
    """The commands name no setting; resolved by the scripts, they are rankgrpo/sandbox/settings.py's,
    with REPORT on top. --quick passes its smaller sizes."""
    tasks = {t.name: t for t in pt.plan(_cfg("--replicates", "0"))}
    world = tasks["world"].cmd
    assert world[world.index("--out") + 2:] == ["--preset", "demo"]
    assert tasks["demos/full"].cmd[-4:] == ["--world", str(Path("OUT/world")), "--out", str(Path("OUT/demos/full"))]
    for name, stage, extra in (("sft/full", settings.SFT, settings.REPORT["sft"]),
                               ("rl/on/rank_grpo_exp_inf", settings.RL, settings.REPORT["rl"]),
                               ("eval/rl/on/rank_grpo_exp_inf", settings.EVALUATE, settings.REPORT["evaluate"])):
        cfg = resolve(tasks[name])
        assert {k: getattr(cfg, k) for k in stage} == {**stage, **{k: v for k, v in extra.items() if k in stage}}
        assert {k: getattr(cfg, k) for k in extra} == dict(extra)
    quick = {t.name: t for t in pt.plan(_cfg("--quick"))}
    assert (resolve(quick["sft/full"]).max_steps, resolve(quick["rl/on/grpo"]).steps) == (40, 3)
    world = quick["world"].cmd
    assert world[world.index("--n-train") + 1] == "1000"


def test_arms_filter_and_unknown_arm():
    tasks = pt.plan(_cfg("--arms", "on/grpo"))
    assert [t.name for t in tasks if t.name.startswith("rl/")] == ["rl/on/grpo", "rl/seed3408/on/grpo",
                                                                   "rl/seed3409/on/grpo"]
    with pytest.raises(SystemExit, match="unknown arm"):
        pt.plan(_cfg("--arms", "on/ppo"))
    tasks = pt.plan(_cfg("--sft-arms", "no_reflect", "--arms", "on/grpo", "--replicates", "0"))
    assert {t.name for t in tasks if t.name.startswith(("sft/", "demos/"))} == {
        "demos/full", "demos/no_reflect", "sft/full", "sft/no_reflect"}  # full is every RL arm's start
    with pytest.raises(SystemExit, match="unknown SFT arm"):
        pt.plan(_cfg("--sft-arms", "no_adjust"))


def test_paired_difference_by_hand():
    a = {"x": {"m": 0.5}, "y": {"m": 0.2}, "z": {"m": 0.0}, "only_a": {"m": 9.0}}
    b = {"x": {"m": 0.1}, "y": {"m": 0.2}, "z": {"m": 0.3}}
    d = pt.paired(a, b, "m")
    # differences 0.4, 0.0, -0.3: mean 1/30, sample sd sqrt(0.37/3 ... ) computed by hand
    diffs = [0.4, 0.0, -0.3]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d["mean"] == pytest.approx(mean) and d["stderr"] == pytest.approx(sd / math.sqrt(3))
    assert (d["better"], d["worse"], d["n"]) == (1, 1, 3)


@pytest.mark.parametrize("mean,se,word", [(0.03, 0.01, "holds"), (0.01, 0.01, "not resolved"),
                                          (-0.01, 0.01, "not resolved"), (-0.05, 0.01, "reversed")])
def test_verdict_thresholds(mean, se, word):
    assert pt.verdict({"mean": mean, "stderr": se}).startswith(word)


@pytest.mark.parametrize("gains,z,word", [([0.01, 0.02, 0.02, 0.03], 3.0, "holds"),
                                          ([0.02, 0.02, 0.02, 0.02], 3.0, "does not"),
                                          ([0.03, 0.02, 0.04, 0.05], 3.0, "does not"),
                                          ([-0.001, 0.0006, 0.0006, 0.0006], 0.3, "not resolved"),
                                          ([-0.03, -0.02, -0.01, -0.005], -1.0, "not resolved")])
def test_grows_with_k(gains, z, word):
    assert pt.grows_with_k(gains, z).startswith(word)


def test_smooth_is_a_trailing_mean():
    assert pt.smooth([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert pt.smooth([1, 2, 3], 1).tolist() == [1, 2, 3]


def test_step_breakdown_sums_policy_forward_over_the_rounds_optimiser_steps(tmp_path):
    run = tmp_path / "rl" / "off" / "x"
    run.mkdir(parents=True)
    rows = [{"step": 0, "val_ndcg@20": 0.1}]
    for step in (1, 2):  # round 1 is warm-up and skipped
        for it, update in ((0, 4.0), (1, 9.0)):  # time/update is cumulative over the round
            rows.append({"step": step, "iteration": it, "loss": 0.0, "time/sample": 2.0, "time/score": 0.1,
                         "time/ref": 1.0, "time/update": update, "time/policy_forward": 1.5,
                         "completion_tokens": 100.0, "samples_per_s": 64 / 12.1})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = pt.step_breakdown(tmp_path, "off/x")
    assert b["rounds"] == 1
    assert b["policy_forward"] == pytest.approx(3.0) and b["backward_optimizer"] == pytest.approx(6.0)
    assert b["total"] == pytest.approx(2.0 + 0.1 + 1.0 + 9.0) and b["samples_per_s"] == pytest.approx(64 / 12.1)


def test_every_run_is_replicated_at_each_seed_and_rl_starts_from_the_sft_run_of_its_seed():
    tasks = {t.name: t for t in pt.plan(_cfg("--replicates", "2", "--replicate", "all"))}

    def flag(t, f):
        return t.cmd[t.cmd.index(f) + 1]

    for seed in (3408, 3409):
        for arm in pt.RL_ARMS:
            rep, main = tasks[f"rl/seed{seed}/{arm.name}"], tasks[f"rl/{arm.name}"]
            assert flag(rep, "--seed") == str(seed) and flag(main, "--seed") == "3407"
            start = "OUT/world/base_model" if arm.start == "world" else f"OUT/sft/seed{seed}/full/final"
            assert flag(rep, "--model") == str(Path(start))
            assert flag(rep, "--out") == str(Path(f"OUT/rl/seed{seed}/{arm.name}"))
            differ = {i for i, (x, y) in enumerate(zip(rep.cmd, main.cmd)) if x != y}
            assert {rep.cmd[i - 1] for i in differ} <= {"--out", "--seed", "--model"}  # nothing else changes
            assert rep.deps == (["world"] if arm.start == "world" else [f"sft/seed{seed}/full"])
            assert f"eval/rl/seed{seed}/{arm.name}" in tasks
        for name, _, _ in pt.SFT_ARMS:
            sft = tasks[f"sft/seed{seed}/{name}"]
            assert flag(sft, "--train-data") == str(Path(f"OUT/demos/{name}/train.jsonl"))
            assert flag(sft, "--seed") == str(seed)
            assert f"eval/sft/seed{seed}/{name}" in tasks
    assert len([n for n in tasks if n.startswith("eval/")]) == 3 * (10 + 3 + 9 + 3) + 1  # the base model once
    assert {f"eval/constrained/sft/seed{s}/full" for s in (3408, 3409)} <= set(tasks)
    core = {t.name for t in pt.plan(_cfg("--replicates", "2"))}  # the default
    assert {n for n in core if "seed3409" in n and n.startswith("rl/")} == {
        f"rl/seed3409/{a.name}" for a in pt.RL_ARMS if a.mu == 1}
    assert {n for n in core if "seed3409" in n and n.startswith("sft/")} == {"sft/seed3409/full"}
    assert pt.at_seed("rl/on/grpo", 3408, _cfg()) == "rl/seed3408/on/grpo"
    assert pt.at_seed("sft/full", 3407, _cfg()) == "sft/full"
    assert pt.at_seed("teacher", 3408, _cfg()) == "teacher"  # baselines are the same at every seed
    assert _cfg("--quick").replicates == 0 and _cfg().replicates == 2


@pytest.mark.parametrize("words,start", [(["holds"] * 3, "**shown**"), (["reversed"] * 3, "**refuted**"),
                                         (["does not hold", "reversed", "does not hold"], "**refuted**"),
                                         (["holds", "holds", "not resolved"], "not shown (holds at 2/3, against at 0/3)"),
                                         (["holds", "reversed", "holds"], "not shown (holds at 2/3, against at 1/3)")])
def test_a_claim_is_shown_only_when_every_seed_agrees(words, start):
    assert pt.combine_verdicts(words).startswith(start)


def test_judge_claims_pairs_each_seed_with_its_own_sft_run():
    cfg = _cfg("--replicates", "1")
    # two conversations; at seed 3407 exp_inf beats SFT by 0.2 and 0.1 (SE 0.05: 3 SE), at seed 3408 it
    # loses on one and wins on the other (mean 0, not resolved)
    def rows(a, b):
        return {"a": {f"ndcg@{k}": a for k in pt.KS}, "b": {f"ndcg@{k}": b for k in pt.KS}}

    per = {"sft/full": rows(0.1, 0.2), "rl/on/rank_grpo_exp_inf": rows(0.3, 0.3),
           "sft/seed3408/full": rows(0.5, 0.0), "rl/seed3408/on/rank_grpo_exp_inf": rows(0.4, 0.1)}
    claims = {c["claim"]: c for c in pt.judge_claims(cfg, {}, per, {})}
    c = claims["on-policy: SFT + Rank-GRPO (exp∞) > SFT"]
    assert c["per_seed"][0].startswith("holds (+0.1500, 3.0 SE)")
    assert c["per_seed"][1].startswith("not resolved (+0.0000")
    assert c["verdict"] == "not shown (holds at 1/2, against at 0/2)"
    assert "on-policy: GRPO > SFT" not in claims  # claims whose runs are missing are left out
    per |= {"rl/on/grpo": rows(0.2, 0.2)}  # run at the main seed only: reported, not judged
    one = {c["claim"]: c for c in pt.judge_claims(cfg, {}, per, {})}["on-policy: GRPO > SFT"]
    assert one["verdict"] == "not judged: 1 of 2 seeds run (not resolved at seed 3407)" and one["per_seed"][1] == "–"
    assert set(claims) == {"on-policy: SFT + Rank-GRPO (exp∞) > SFT", "gains over SFT grow with k (Rank-GRPO exp∞)"}


def test_without_matplotlib_the_run_warns_before_any_work_and_writes_tables_only(monkeypatch, capsys):

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    seen = {}
    monkeypatch.setattr(pt, "run_tasks", lambda tasks, cfg: seen.setdefault("figures", cfg.figures))
    monkeypatch.setattr(pt, "build_report", lambda cfg: "report")
    monkeypatch.setattr(pt, "save_config", lambda *a, **k: None)
    monkeypatch.setattr(pt.Path, "mkdir", lambda *a, **k: None)
    assert pt.main(["--out", "OUT", "--quick", "--select-rl-lrs", "--no-constrained-eval"]) == 0
    assert seen == {"figures": False}
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ran = []
    monkeypatch.setattr(pt, "run_tasks", lambda tasks, cfg: ran.append(cfg.sft_steps))
    monkeypatch.setattr(pt, "build_report", lambda cfg: "report")
    argv = ["--out", str(out), "--no-figures", "--sft-steps", "100", "--select-rl-lrs", "--no-constrained-eval"]
    assert pt.main(argv) == 0 and ran == [100]
    # another selection of arms, jobs or replicates is fine: they choose runs, not their contents
    assert pt.main(argv + ["--jobs", "1", "--arms", "on/grpo", "--replicates", "0"]) == 0 and ran == [100, 100]
    with pytest.raises(SystemExit, match=r"other settings \(sft_steps: 100 -> 200\)"):
        pt.main(argv[:-3] + ["200"] + argv[-2:])
    with pytest.raises(SystemExit, match="rl_lr"):
        pt.main(argv + ["--rl-lr", "1e-3"])
    assert ran == [100, 100]
    saved = json.loads((out / "paper_tables_config.json").read_text())
    assert saved["sft_steps"] == 100  # the refused runs wrote nothing
    assert pt.main(argv + ["--report-only"]) == 0  # reading a finished run is not a rerun


def test_stage_seconds_survive_across_invocations(tmp_path):
    record_seconds(tmp_path, "world", 10.04)
    record_seconds(tmp_path, "sft/full", 600.0)
    record_seconds(tmp_path, "world", 12.0)  # a rerun replaces the stage's time
    assert json.loads((tmp_path / "stage_seconds.json").read_text()) == {"world": 12.0, "sft/full": 600.0}


def test_list_shape_by_hand():
    rows = {"a": {"completion": "Alpha (2001)\nBeta (2002)\nAlpha (2001)"},
            "b": {"completion": "Alpha (2001)\nBeta (2002)"},
            "c": {"completion": "Gamma (2003)\nnot a list line"}}
    s = pt.list_shape(rows)
    assert s["valid_lines"] == pytest.approx(2.0) and s["distinct_items"] == pytest.approx(5 / 3)
    assert s["lists_with_repeats"] == pytest.approx(1 / 3)
    assert (s["different_lists"], s["different_items"]) == (2, 3) and s["top_list_share"] == pytest.approx(2 / 3)


def test_noise_section_reads_every_run_at_every_seed():
    """Synthetic aggregates: run r at seed s scores N@20 = base[r] + (s - 3407) / 100 and N@5 half of it."""
    cfg = _cfg("--replicates", "1")
    base = {"sft/full": 0.10, "rl/on/grpo": 0.20, "rl/on/rank_grpo_log": 0.30, "rl/on/rank_grpo_exp_inf": 0.40}
    agg = {}
    for name, b in base.items():
        for seed in (3407, 3408):
            v = b + (seed - 3407) / 100
            agg[pt.at_seed(name, seed, cfg)] = {"ndcg@20": {"mean": v}, "ndcg@5": {"mean": v / 2}}
    agg["teacher"] = {"ndcg@20": {"mean": 0.3}, "ndcg@5": {"mean": 0.2}}  # a baseline is not a trained run
    label = {n: n for n in agg}
    md = pt.noise_section(cfg, agg, {}, label)
    for name, b in base.items():  # N@20 at each seed, mean, spread, N@5 at each seed
        assert (f"| {name} | {b:.4f} | {b + 0.01:.4f} | {b + 0.005:.4f} | 0.0100 | {b / 2:.4f} | "
                f"{(b + 0.01) / 2:.4f} |") in md
    assert not any(line.startswith("| teacher") for line in md)
    ratio = next(line for line in md if line.startswith("On-policy N@20 ratio"))
    assert f"seed 3407: {0.40 / 0.20:.3f}, seed 3408: {0.41 / 0.21:.3f}" in ratio
    assert pt.noise_section(_cfg("--replicates", "0"), agg, {}, label) == []


def test_a_killed_run_stops_its_stages(tmp_path):
    """SIGTERM to the scheduler (rankgrpo.task_runner, which every benchmark pipeline uses) terminates
    the running stages too (no orphan keeps writing)."""
    import os
    import signal
    import subprocess
    import time

    marker = tmp_path / "child.pid"
    code = ("import sys; from pathlib import Path; from rankgrpo.task_runner import Task, run_tasks; "
            "run_tasks([Task('sleep', [sys.executable, '-c', "
            "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(60)', sys.argv[2]], "
            "Path(sys.argv[1]) / 'never')], Path(sys.argv[1]), jobs=1)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out"), str(marker)])
    for _ in range(1200):  # up to 60 s: importing the benchmark takes seconds on a loaded machine
        if marker.exists() and marker.read_text():
            break
        time.sleep(0.05)
    child = int(marker.read_text())
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # the stage is gone with its scheduler
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


@pytest.mark.parametrize("replicate", ["core", "all"])
def test_build_report_reads_every_evaluation_at_every_seed(tmp_path, monkeypatch, replicate):
    """The report from synthetic finished runs: every table, the claim at each seed, no figure."""
    from rankgrpo.metrics import aggregate

    cfg = _cfg("--out", str(tmp_path), "--results", str(tmp_path / "res"), "--replicate", replicate, "--no-figures")
    ids = [f"c{i}" for i in range(4)]

    def rows(level):  # run quality `level`, spread over the conversations so SEs are non-zero
        out = []
        for j, i in enumerate(ids):
            v = level + 0.01 * j
            out.append({"id": i, "completion": "Alpha (2001)\nBeta (2002)", "in_catalog": 1.0, "format_valid": 1.0,
                        "n_items": 2, **{f"{m}@{k}": v for m in ("recall", "ndcg") for k in pt.KS},
                        "rank_hits": [1] + [0] * 19})
        return out

    for n, (name, _, _) in enumerate(pt.eval_targets(cfg)):
        d = tmp_path / "eval" / name
        d.mkdir(parents=True)
        r = rows(0.1 + 0.01 * n)
        (d / "results.json").write_text(json.dumps({"results": aggregate(r)}))
        (d / "examples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
    for name, _, _ in pt.SFT_ARMS:
        (tmp_path / "demos" / name).mkdir(parents=True)
        metrics = {"ndcg@20": {"mean": 0.5}, "recall@20": {"mean": 0.6}, "in_catalog": {"mean": 1.0}}
        (tmp_path / "demos" / name / "report.json").write_text(json.dumps(
            {"stages": ["raw", "adjust"], "demonstration_stage": "adjust",
             "metrics": {"validation": {"adjust": metrics}}}))
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "catalog.jsonl").write_text("{}\n" * 200)
    base = aggregate(rows(0.05))
    monkeypatch.setattr(pt, "baselines", lambda out: (
        {n: base for n, _, _ in pt.BASELINES}, {n: {r["id"]: r for r in rows(0.05)} for n, _, _ in pt.BASELINES}))
    chosen = {"lr": 1e-4, "group_size": 8, "prompts_per_step": 8}
    (tmp_path / "selection.json").write_text(json.dumps(
        {"rl": {"on/grpo": {"scores": {"lr3e-05_g8x8": 0.3, "lr0.0001_g8x8": 0.31}, "chosen": chosen},
                "off/gspo": {"from": "on/grpo", "chosen": chosen}},
         "decoding": {"scores": {"paper": 0.2, "no_repeats": 0.25}, "runs": ["sft/full", "rl/on/grpo"],
                      "chosen": "no_repeats"}}))
    text = pt.build_report(cfg)
    assert "## Settings chosen on validation" in text and "| + SFT + Vanilla GRPO | 0.3000 | 0.3100 | lr0.0001_g8x8 |" in text
    assert "| + SFT + GSPO (μ=2) | as on/grpo |  | lr0.0001_g8x8 |" in text
    assert "the paper's protocol 0.2000, no repeats 0.2500. Chosen: **no repeats**" in text
    assert "## Every run at every training seed" in text and "SFT beats the popularity floor" in text
    claim = next(line for line in text.splitlines() if line.startswith("| off-policy: Rank-GRPO (exp∞) > GRPO"))
    assert ("not judged" in claim) == (replicate == "core")
    assert "[seed 3409]" in text and "## Figures" not in text and "(Figures not drawn" in text
    assert json.loads((tmp_path / "res" / "summary.json").read_text())["claims"]
    assert "## The same students decoded without repeats" in text
    claim = next(line for line in text.splitlines() if line.startswith("| no repeats: on-policy: Rank-GRPO (exp∞) > GRPO |"))
    assert "not judged" not in claim and "–" not in claim  # judged at every seed, each against its own GRPO
    assert "+ SFT + Rank-GRPO (exp∞) [seed 3409], no repeats" in text  # its list shape
    # the seed-level test with Holm's adjustment beside the per-seed verdicts, and per-rank hit differences
    claims = json.loads((tmp_path / "res" / "summary.json").read_text())["claims"]
    tested = [c for c in claims if c["seed_level"] is not None]
    assert tested and all(c["seed_level"]["n"] == 3 and c["holm"]["p_holm"] >= c["seed_level"]["p"] for c in tested)
    assert all(c["seed_level"] is None for c in claims if "grow" in c["claim"])
    assert "Holm p = " in claim and "## Per-rank hit-rate differences" in text
    # the primary family: the two hypotheses of the decoding chosen on validation, Holm over those two alone
    primary = [c for c in claims if c["family"] == "primary"]
    assert [c["claim"] for c in primary] == list(pt.PRIMARY["no_repeats"])
    secondary = {c["claim"]: c["seed_level"]["p"] for c in claims if c["family"] == "secondary" and c["seed_level"]}
    assert all(c["holm"]["p_holm"] == pytest.approx(min(1.0, max(2 * min(x["seed_level"]["p"] for x in primary),
                                                                 c["seed_level"]["p"]))) for c in primary)
    assert len(secondary) > 2 and "## The primary hypotheses" in text
    assert text.index("## The primary hypotheses") < text.index("## The paper's claims, mechanically")
    assert "| 3409 | +0.0000 (+0.0 to +0.0 SE) |" in text  # rank_hits are equal in every synthetic run


def _validation_result(path, ndcg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"name": "x", "results": {"n_examples": 300,
                                                                              "ndcg@20": {"mean": ndcg}}}))


def test_rl_settings_are_chosen_on_validation_before_any_test_score(tmp_path):
    cfg = _cfg("--out", str(tmp_path), "--select-rl-lrs", "3e-5", "1e-4", "--select-group-shapes", "8x8", "16x4",
               "--replicates", "1")
    tasks = pt.selection_tasks(cfg)
    names = [t.name for t in tasks]
    assert names[:3] == ["world", "demos/full", "sft/full"]
    assert not any(n.startswith("eval/") for n in names)  # selection never scores test
    assert not any("test.jsonl" in " ".join(t.cmd) for t in tasks)
    # the arms judged at every seed are trained with each candidate; the others take their counterpart's
    assert [a.name for a in pt.selection_arms(cfg)] == list(pt.REPLICATED_RL)
    assert {pt.lr_source(a.name) for a in pt.RL_ARMS} == set(pt.REPLICATED_RL)
    cands = pt.candidates(cfg)
    assert [pt.candidate_name(c) for c in cands] == ["lr3e-05_g8x8", "lr3e-05_g16x4", "lr0.0001_g8x8",
                                                     "lr0.0001_g16x4"]
    main = {t.name: t for t in pt.plan(cfg)}
    for arm in pt.selection_arms(cfg):
        for c in cands:
            t = next(t for t in tasks if t.name == f"select/{arm.name}/{pt.candidate_name(c)}")
            ref = main[f"rl/{arm.name}"]
            differ = {t.cmd[i - 1] for i, (x, y) in enumerate(zip(t.cmd, ref.cmd)) if x != y}
            assert differ <= {"--out", "--lr", "--group-size", "--prompts-per-step"} and t.deps == ref.deps
            got = resolve(t)
            assert (got.lr, got.group_size, got.prompts_per_step) == (c["lr"], c["group_size"], c["prompts_per_step"])
            assert got.group_size * got.prompts_per_step == 64  # the same completions a round
            val = next(v for v in tasks if v.name == f"{t.name}/val")
            ev = resolve(val)
            assert val.deps == [t.name] and Path(ev.data).name == "validation.jsonl" and ev.limit == 0
            assert ev.constrained == arm.constrained  # scored in the decoding it was trained in
    # the choice: highest validation NDCG@20; a tie goes to the earlier candidate (smaller rate, first shape)
    for arm in pt.selection_arms(cfg):
        for c in cands:
            v = 0.31 if arm.name == "on/grpo" and c == cands[3] else 0.30
            run = pt.selection_dir(cfg, arm.name, c)
            _validation_result(run / "val_eval", v)
            (run / "final").mkdir(parents=True)
    chosen = pt.choose_rl_settings(cfg)
    assert chosen["on/grpo"]["chosen"] == cands[3] and chosen["on/grpo"]["scores"]["lr0.0001_g16x4"] == 0.31
    assert chosen["off/gspo"] == {"from": "on/grpo", "chosen": cands[3]}
    assert chosen["on/rank_grpo_exp_inf"]["chosen"] == chosen["r1zero/rank_grpo_exp_inf"]["chosen"] == cands[0]
    # every seed of an arm trains with its chosen settings
    planned = {t.name: resolve(t) for t in pt.plan(cfg, {a: c["chosen"] for a, c in chosen.items()})
               if t.name.startswith("rl/")}
    for name in ("rl/on/grpo", "rl/seed3408/on/grpo", "rl/off/gspo"):
        assert (planned[name].lr, planned[name].group_size, planned[name].prompts_per_step) == (1e-4, 16, 4)
    assert planned["rl/on/rank_grpo_exp_inf"].lr == 3e-5 and planned["rl/on/rank_grpo_exp_inf"].group_size == 8
    # the main seed's run of a selection arm is its selection run of the chosen settings, not a second training
    pt.reuse_selection_runs(cfg, chosen)
    link = tmp_path / "rl" / "on" / "grpo"
    assert link.is_symlink() and link.resolve() == pt.selection_dir(cfg, "on/grpo", cands[3]).resolve()
    pt.reuse_selection_runs(cfg, chosen)  # a rerun keeps it
    assert not (tmp_path / "rl" / "off" / "gspo").exists()  # trained at its own seed and arm
    link.unlink()
    (tmp_path / "rl" / "on" / "grpo").mkdir()
    with pytest.raises(SystemExit, match="is not the selection run"):
        pt.reuse_selection_runs(cfg, chosen)


def test_the_decoding_is_chosen_on_validation_by_every_run_started_from_sft(tmp_path):
    cfg = _cfg("--out", str(tmp_path), "--arms", "on/grpo", "on/rank_grpo_exp_inf", "r1zero/rank_grpo_exp_inf")
    tasks = pt.decoding_tasks(cfg)
    assert sorted(t.name for t in tasks) == sorted(f"val/{m}{n}" for m in ("", pt.CONSTRAINED) for n in (
        "sft/full", "rl/on/grpo", "rl/on/rank_grpo_exp_inf"))  # R1-zero has no SFT start: not counted
    for t in tasks:
        ev = resolve(t)
        assert Path(ev.data).name == "validation.jsonl" and ev.constrained == ("constrained/" in t.name)
    # the higher mean wins: here the no-repeat decoding, by 0.01 on average over the three runs
    for n, (paper, no_rep) in {"sft/full": (0.30, 0.33), "rl/on/grpo": (0.32, 0.32),
                               "rl/on/rank_grpo_exp_inf": (0.34, 0.34)}.items():
        _validation_result(tmp_path / "val_eval" / n, paper)
        _validation_result(tmp_path / "val_eval" / pt.CONSTRAINED / n, no_rep)
    dec = pt.choose_decoding(cfg)
    assert dec["chosen"] == "no_repeats" and dec["scores"]["no_repeats"] - dec["scores"]["paper"] == pytest.approx(0.01)
    _validation_result(tmp_path / "val_eval" / pt.CONSTRAINED / "sft/full", 0.30)  # a tie: the paper's protocol
    assert pt.choose_decoding(cfg)["chosen"] == "paper"
