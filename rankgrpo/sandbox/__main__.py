"""Command line of the sandbox.

    python -m rankgrpo.sandbox --out DIR [--seed 0 --n-films 3000 ...]   build a world (every SandboxConfig field)
    python -m rankgrpo.sandbox --out DIR --preset demo                 the world of make demo and the benchmark report
    python -m rankgrpo.sandbox --out DIR --calibrate                   build, then calibrate
    python -m rankgrpo.sandbox --out DIR --pretrain-steps 300          a base model that knows its films
    python -m rankgrpo.sandbox calibrate --world DIR [--ooc-rate ...]   calibrate (every TeacherConfig field)
    python -m rankgrpo.sandbox baseline --world DIR --kind popularity --out FILE
                                                                      a baseline's lists as predictions JSONL,
                                                                      for evaluate.py --predictions FILE
    python -m rankgrpo.sandbox settings [STAGE[.FIELD]] [--flags]      the demo's settings of every stage
                                                                      (rankgrpo/sandbox/settings.py): JSON, one
                                                                      value, or a stage as command-line flags
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from typing import ClassVar, Mapping

from rankgrpo.config import arg, parse_config
from rankgrpo.sandbox import settings
from rankgrpo.sandbox.config import SandboxConfig, TeacherConfig


@dataclass
class BuildCommand(SandboxConfig):
    """Build a sandbox world: catalog, splits and base model."""

    PRESETS: ClassVar[dict] = {"": {}, "demo": settings.WORLD}

    preset: str = arg("", "'demo': the world of make demo and the benchmark report, the one the scripts build "
                          "in sandbox_world/ on first use (rankgrpo/sandbox/settings.py). Empty: the defaults "
                          "below. A flag given on the command line wins.", choices=["", "demo"])
    out: str = arg("sandbox_world", "Directory to write the world into.")
    calibrate: bool = arg(False, "Calibrate on the test split after building.")
    resume: bool = arg(False, "Keep a complete world already in --out if this code built it from these settings "
                              "(the manifest's config and generator version); otherwise build it.")


@dataclass
class SettingsCommand:
    """Print the sandbox's settings (rankgrpo/sandbox/settings.py): every stage as JSON, one stage or
    value by dotted path (rl, rl.lr, report.sft.eval_every), or with --flags a stage as the
    command-line flags that set it."""

    path: str = arg("", "Dotted path of a stage or value; empty: every stage.")
    flags: bool = arg(False, "Print the stage as command-line flags (--n-films 200 --title-tokens ...).")


@dataclass
class CalibrateCommand(TeacherConfig):
    """Score popularity, the raw simulated teacher and the oracle on a split of a sandbox world."""

    world: str = arg("sandbox_world", "Directory of a world written by `python -m rankgrpo.sandbox --out DIR`.")
    split: str = arg("test", "Split to score.", choices=("train", "validation", "test"))
    limit: int = arg(0, "Score only the first LIMIT samples (0: all).")


@dataclass
class BaselineCommand(TeacherConfig):
    """Write a baseline's lists for every sample of a split as predictions JSONL ({"id", "completion"}),
    so that `evaluate.py --predictions FILE` scores them exactly as it scores a model."""

    world: str = arg("sandbox_world", "Directory of a world written by `python -m rankgrpo.sandbox --out DIR`.")
    split: str = arg("test", "Split to write lists for.", choices=("train", "validation", "test"))
    kind: str = arg("popularity", "'popularity': the most popular unseen films; 'teacher': the raw simulated "
                                  "teacher (its TeacherConfig fields apply); 'oracle': the latent relevance "
                                  "ranking.", choices=("popularity", "teacher", "oracle"))
    n_items: int = arg(20, "List length.", min=1)
    limit: int = arg(0, "Only the first LIMIT samples of the split, as `evaluate.py --limit` (0: all).", min=0)
    out: str = arg("baseline.jsonl", "Predictions JSONL to write (atomically).")


def _only(cls, cfg):
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def _calibrate(world_dir: str, teacher_cfg: TeacherConfig, split: str = "test", limit: int = 0) -> None:
    from rankgrpo.sandbox.baselines import calibrate, calibration_report
    from rankgrpo.sandbox.build import load_world
    from rankgrpo.sandbox.teacher import SandboxTeacher

    world = load_world(world_dir)
    t0 = time.perf_counter()
    results = calibrate(world, SandboxTeacher(world, teacher_cfg), split, limit=limit or None)
    print(f"calibration on {split} ({time.perf_counter() - t0:.1f}s)")
    print(calibration_report(results))


def print_settings(path: str = "", as_flags: bool = False) -> None:
    """``python -m rankgrpo.sandbox settings [PATH] [--flags]``."""
    import json

    from rankgrpo.config import to_flags

    try:
        value = settings.lookup(path) if path else settings.STAGES
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    if as_flags:
        if not isinstance(value, Mapping) or any(isinstance(v, Mapping) for v in value.values()):
            raise SystemExit(f"error: --flags needs a stage of flat values (world, demos, sft, rl, evaluate, "
                             f"report.sft, ...), got {path or 'every stage'!r}")
        print(" ".join(to_flags(dict(value))))
    elif isinstance(value, Mapping):
        print(json.dumps(settings.as_dict(value), indent=2))
    else:
        print(value)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "settings":
        rest = argv[1:]
        path = rest.pop(0) if rest and not rest[0].startswith("-") else ""
        cmd = parse_config(SettingsCommand, ["--path", path, *rest])
        print_settings(cmd.path, cmd.flags)
        return
    if argv and argv[0] == "calibrate":
        cmd = parse_config(CalibrateCommand, argv[1:])
        _calibrate(cmd.world, _only(TeacherConfig, cmd), cmd.split, cmd.limit)
        return
    if argv and argv[0] == "baseline":
        cmd = parse_config(BaselineCommand, argv[1:])
        from rankgrpo.sandbox.baselines import baseline_predictions
        from rankgrpo.sandbox.build import load_world
        from rankgrpo.sandbox.teacher import SandboxTeacher

        world = load_world(cmd.world)
        teacher = SandboxTeacher(world, _only(TeacherConfig, cmd)) if cmd.kind == "teacher" else None
        rows = baseline_predictions(world, cmd.kind, cmd.split, teacher=teacher, n_items=cmd.n_items,
                                    limit=cmd.limit or None)
        from rankgrpo.io import atomic_write_jsonl

        atomic_write_jsonl(cmd.out, rows)
        print(f"{cmd.kind}: {len(rows)} lists for {cmd.split} in {cmd.out}")
        return
    cmd = parse_config(BuildCommand, argv)
    from rankgrpo.sandbox.build import build_world, ensure_world

    t0 = time.perf_counter()
    if cmd.resume:
        ensure_world(cmd.out, _only(SandboxConfig, cmd), verbose=True)
        print(f"ready in {time.perf_counter() - t0:.1f}s")
    else:
        build_world(_only(SandboxConfig, cmd), cmd.out, verbose=True)
        print(f"built in {time.perf_counter() - t0:.1f}s")
    if cmd.calibrate:
        _calibrate(cmd.out, TeacherConfig())


if __name__ == "__main__":
    main()
