"""One source for the sandbox's settings (rankgrpo/sandbox/settings.py): every script, parsed with no
flags, resolves to them; the world the scripts build on first use is the demo's; `--preset paper`
still gives the paper's values; and scripts/demo.sh and benchmarks/paper_tables.py hold no copies
of the numbers."""
from __future__ import annotations

import doctest
import io
import re
import tokenize
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import rankgrpo.config
from rankgrpo.config import parse_config
from rankgrpo.sandbox import SandboxConfig, settings
from rankgrpo.sandbox.__main__ import BuildCommand
from rankgrpo.sandbox.__main__ import main as sandbox_main
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path):
    """A script or benchmark as a module."""
    return load_script(path, name)


build_demos = load("build_demos", ROOT / "build_demos.py")
train_sft = load("train_sft", ROOT / "train_sft.py")
train_rankgrpo = load("train_rankgrpo", ROOT / "train_rankgrpo.py")
evaluate = load("evaluate", ROOT / "evaluate.py")

# (stage, the script's config, the flags a bare run needs): evaluate.py needs a source of lists
SCRIPTS = [
    (settings.DEMOS, build_demos.BuildDemosConfig, []),
    (settings.SFT, train_sft.TrainSFTConfig, []),
    (settings.RL, train_rankgrpo.TrainRankGRPOConfig, []),
    (settings.EVALUATE, evaluate.EvaluateConfig, ["--model", "runs/rankgrpo/final"]),
]


def world_of(cmd: BuildCommand) -> SandboxConfig:
    """The SandboxConfig a build command builds."""
    return SandboxConfig(**{f.name: getattr(cmd, f.name) for f in fields(SandboxConfig)})


def resolved(stage, cfg) -> dict:
    return {name: getattr(cfg, name) for name in stage}


def default_of(cls, name):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


@pytest.mark.parametrize("stage,cls,argv", SCRIPTS, ids=["build_demos", "train_sft", "train_rankgrpo", "evaluate"])
def test_every_script_without_flags_runs_the_sandbox_settings(stage, cls, argv):
    cfg = parse_config(cls, argv)
    assert cfg.preset == "sandbox"
    assert resolved(stage, cfg) == dict(stage)
    assert resolved(stage, parse_config(cls, ["--preset", "sandbox", *argv])) == dict(stage)


@pytest.mark.parametrize("stage,cls,argv", SCRIPTS, ids=["build_demos", "train_sft", "train_rankgrpo", "evaluate"])
def test_paper_preset_keeps_the_real_data_defaults_and_a_given_flag_wins(stage, cls, argv):
    paper = parse_config(cls, ["--preset", "paper", *argv])
    expected = {name: cls.PRESETS["paper"].get(name, default_of(cls, name)) for name in stage}
    assert resolved(stage, paper) == expected
    # the sandbox differs from the paper somewhere in every stage (else the preset would be moot)
    assert expected != dict(stage)
    name = next(n for n, v in stage.items() if isinstance(v, int) and not isinstance(v, bool))
    given = parse_config(cls, [*argv, f"--{name.replace('_', '-')}", str(stage[name] + 7)])
    assert getattr(given, name) == stage[name] + 7


def test_the_paper_presets_are_the_papers():
    sft = parse_config(train_sft.TrainSFTConfig, ["--preset", "paper"])
    assert (sft.lr, sft.micro_batch_size * sft.grad_accum, sft.warmup_ratio) == (5e-5, 384, 0.05)
    rl = parse_config(train_rankgrpo.TrainRankGRPOConfig, ["--preset", "paper"])
    assert (rl.lr, rl.prompts_per_step * rl.group_size, rl.max_new_tokens, rl.beta) == (1e-6, 384, 1024, 1e-3)
    ev = parse_config(evaluate.EvaluateConfig, ["--preset", "paper", "--model", "m"])
    assert (ev.limit, ev.max_new_tokens, ev.stop_after_items) == (0, 1024, 0)
    demos = parse_config(build_demos.BuildDemosConfig, ["--preset", "paper"])
    assert (demos.train_fraction, demos.report_train) == (0.25, 1000)


def test_the_demo_world_is_what_the_scripts_build_on_first_use(tmp_path, monkeypatch):
    cmd = parse_config(BuildCommand, ["--preset", "demo"])
    assert world_of(cmd) == settings.world_config()
    assert {k: getattr(settings.world_config(), k) for k in settings.WORLD} == dict(settings.WORLD)
    # without --preset the command keeps SandboxConfig's own defaults
    assert world_of(parse_config(BuildCommand, [])) == SandboxConfig()

    # build_demos.py on a directory without a world builds one with ensure_world's default: the demo's
    from rankgrpo.sandbox import build

    built = []
    monkeypatch.setattr(build, "build_world", lambda cfg, out, verbose=False: built.append(cfg) or "world")
    assert build_demos.prepare_world(str(tmp_path / "none"), log=lambda s: None) == "world"
    assert built == [settings.world_config()]


def test_the_bare_scripts_chain_into_each_other():
    """python build_demos.py && python train_sft.py && python train_rankgrpo.py && python evaluate.py
    --model runs/rankgrpo/final: each reads what the one before wrote, and all use one world."""
    demos = parse_config(build_demos.BuildDemosConfig, [])
    sft = parse_config(train_sft.TrainSFTConfig, [])
    rl = parse_config(train_rankgrpo.TrainRankGRPOConfig, [])
    ev = parse_config(evaluate.EvaluateConfig, ["--model", "runs/rankgrpo/final"])
    world = Path(demos.world)
    assert Path(sft.model) == world / "base_model"
    assert {Path(sft.catalog), Path(rl.catalog), Path(ev.catalog)} == {world / "catalog.jsonl"}
    assert (Path(sft.train_data), Path(sft.val_data)) == (Path(demos.out) / "train.jsonl",
                                                          Path(demos.out) / "validation.jsonl")
    assert Path(rl.model) == Path(sft.out) / "final"
    assert (Path(rl.data), Path(rl.val_data), Path(ev.data)) == (world / "train.jsonl", world / "validation.jsonl",
                                                                 world / "test.jsonl")
    assert Path(ev.model) == Path(rl.out) / "final"


def numbers(text: str) -> set[float]:
    """Every numeric literal in ``text`` as a float (3e-3, 0.003, 1200 ...)."""
    return {float(m) for m in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])", text)}


def python_numbers(path: Path) -> set[float]:
    """The numeric literals of a Python file's code (not its strings or comments)."""
    toks = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return {float(t.string.replace("_", "")) for t in toks if t.type == tokenize.NUMBER and "j" not in t.string}


# The values that identify the settings: a copy of any of them means a second source of truth.
IDENTIFYING = {
    "rl.lr": settings.RL["lr"], "sft.lr": settings.SFT["lr"], "sft.max_steps": settings.SFT["max_steps"],
    "rl.steps": settings.RL["steps"], "rl.stop_after_lines": settings.RL["stop_after_lines"],
    "world.n_train": settings.WORLD["n_train"], "world.pretrain_steps": settings.WORLD["pretrain_steps"],
    "world.pretrain_chat_questions": settings.WORLD["pretrain_chat_questions"],
    "evaluate.limit": settings.EVALUATE["limit"], "report.sft.eval_every": settings.REPORT["sft"]["eval_every"],
    "seed": settings.SEED,
}


def test_demo_script_passes_paths_and_the_seed_only():
    text = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.findall(r"--[a-z-]+[ =]+[\"']?[0-9.]", code), "demo.sh passes a number to a flag"
    copies = {k for k, v in IDENTIFYING.items() if v in numbers(code)}
    assert not copies, f"scripts/demo.sh copies {copies}"
    assert "--preset demo" in code and "rankgrpo.sandbox settings" in code


def test_paper_tables_reads_the_settings_instead_of_copying_them():
    copies = {k for k, v in IDENTIFYING.items() if v in python_numbers(ROOT / "benchmarks" / "paper_tables.py")}
    assert not copies, f"benchmarks/paper_tables.py copies {copies}"
    assert "1e-4" not in (ROOT / "benchmarks" / "paper_tables.py").read_text(encoding="utf-8")


def test_the_copy_check_can_fail():
    assert settings.RL["lr"] in numbers("--lr 1e-4") and settings.SFT["lr"] in numbers("x = 0.003")
    assert settings.SFT["max_steps"] in numbers(f"--max-steps {settings.SFT['max_steps']}") and not numbers("seed$SEED/sft 2.7M")


def test_settings_command_prints_values_and_flags(capsys):
    sandbox_main(["settings", "rl.lr"])
    assert float(capsys.readouterr().out) == settings.RL["lr"]
    sandbox_main(["settings", "world", "--flags"])
    flags = capsys.readouterr().out.split()
    assert world_of(parse_config(BuildCommand, flags)) == settings.world_config()
    sandbox_main(["settings"])
    assert '"stop_after_items": 30' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no setting 'rl.lrr'"):
        sandbox_main(["settings", "rl.lrr"])


def test_settings_are_read_only_and_doctests_pass():
    with pytest.raises(TypeError):
        settings.RL["lr"] = 1.0  # type: ignore[index]
    assert doctest.testmod(settings).failed == 0 and doctest.testmod(rankgrpo.config).failed == 0
