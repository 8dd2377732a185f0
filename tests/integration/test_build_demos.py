"""build_demos.py on a tiny sandbox world: outputs, validity, the cache, faults, ablations, bad input."""
from __future__ import annotations

import doctest
import json
import os
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from rankgrpo.data import CONVERSATION_MARKER, load_examples
from rankgrpo.demos import report as demos_report
from rankgrpo.demos.pipeline import train_subset
from rankgrpo.demos.teacher import ChatTeacher, TeacherError
from rankgrpo.parsing import parse_recommendations
from rankgrpo.sandbox import SandboxConfig, SandboxTeacher, build_world, load_world
from rankgrpo.scripts import load_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
build_demos = load_script(ROOT / "build_demos.py")

TINY = SandboxConfig(n_films=300, n_train=200, n_validation=50, n_test=50, build_model=False)
FIELDS = {"prompt", "completion", "seen_titles", "groundtruth_with_release_year", "id"}
OUTPUTS = ("train.jsonl", "validation.jsonl", "report.json")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "tiny"
    build_world(TINY, out)
    return out


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


@pytest.fixture(scope="module")
def default_run(world_dir, tmp_path_factory):
    """One run with every default of the paper preset but the world and the output directory."""
    out = tmp_path_factory.mktemp("runs") / "demos"
    build_demos.main(["--preset", "paper", "--world", str(world_dir), "--out", str(out)])
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _completions(path: Path) -> dict[str, str]:
    return {ex.id: ex.completion for ex in load_examples(path)}


def _config(world_dir: Path, out: Path, **kw) -> build_demos.BuildDemosConfig:
    return build_demos.BuildDemosConfig(world=str(world_dir), out=str(out), **kw)


def test_docstring_examples():
    result = doctest.testmod(demos_report)
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------------------- the default run


def test_default_run_writes_valid_demonstrations_for_a_seeded_quarter_of_train_and_all_validation(
        default_run, world_dir, world):
    for name in OUTPUTS + ("config.json", "cache/teacher.jsonl"):
        assert (default_run / name).is_file(), name
    train_all = load_examples(world_dir / "train.jsonl")
    val_all = load_examples(world_dir / "validation.jsonl")
    chosen = [train_all[i].id for i in train_subset(len(train_all), 0.25, 0, seed=0)]
    train, val = load_examples(default_run / "train.jsonl"), load_examples(default_run / "validation.jsonl")
    assert [ex.id for ex in train] == chosen and len(chosen) == round(len(train_all) / 4)
    assert [ex.id for ex in val] == [ex.id for ex in val_all]
    by_id = {ex.id: ex for ex in train_all + val_all}
    for line in (default_run / "train.jsonl").read_text().splitlines()[:3]:
        assert FIELDS <= set(json.loads(line))
    for ex in train + val:
        source = by_id[ex.id]  # the example is kept as it was, with the demonstration added
        assert (ex.messages, ex.seen_titles, ex.groundtruth) == (source.messages, source.seen_titles,
                                                                   source.groundtruth)
        items = parse_recommendations(ex.completion)
        assert len(items) == 20 and all(it.exact for it in items), ex.completion
        assert all(world.catalog.lookup(it.title, it.year, 0) is not None for it in items)
        seen = {t.casefold() for t in ex.seen_titles}
        assert not any(it.title.casefold() in seen for it in items)
        assert len({it.key for it in items}) == 20
    report = _report(default_run)
    assert report["stages"] == ["raw", "remap", "reflect", "adjust"] and report["demonstration_stage"] == "adjust"
    n = len(train) + len(val)
    assert report["checks"] == dict(demonstrations=n, format_valid=n, in_catalog=n, no_seen_title=n, no_repeat=n)
    assert report["counts"]["validation"]["demonstrations"] == len(val)
    assert report["failures"]["teacher_list"] == report["failures"]["judge"] == 0
    stages = report["metrics"]["validation"]
    assert set(stages) == {"raw", "remap", "reflect", "adjust"} and stages["raw"]["n_examples"] == len(val)
    assert stages["raw"]["in_catalog"]["mean"] < 1.0  # the simulated teacher lists out-of-catalog films
    for stage in ("remap", "reflect", "adjust"):
        assert stages[stage]["in_catalog"]["mean"] == stages[stage]["format_valid"]["mean"] == 1.0
    assert stages["reflect"]["ndcg@20"]["mean"] > stages["raw"]["ndcg@20"]["mean"]
    # Adjust is fitted on the training ground truths: in-sample it must gain (on 50 conversations it
    # overfits, so validation is not asserted here; the benchmark reports it on the default world)
    train_stages = report["metrics"]["train"]
    assert train_stages["adjust"]["ndcg@20"]["mean"] > train_stages["reflect"]["ndcg@20"]["mean"]
    assert train_stages["raw"]["n_examples"] == len(train)
    assert {"teacher lists", "remap", "reflect", "adjust", "total"} <= set(report["seconds"])
    config = json.loads((default_run / "config.json").read_text())
    assert config["train_data"] == str(world_dir / "train.jsonl")
    assert config["cache_dir"] == str(default_run / "cache")


def test_train_subset_is_seeded_nested_and_capped():
    a = train_subset(1000, 0.25, 0, seed=0)
    assert a == train_subset(1000, 0.25, 0, seed=0) and len(a) == 250 and a == sorted(a)
    assert a != train_subset(1000, 0.25, 0, seed=1)
    small = train_subset(1000, 0.25, 100, seed=0)
    assert len(small) == 100 and set(small) <= set(a)


def test_rerun_makes_no_teacher_call_and_writes_identical_files(default_run, world_dir):
    before = {name: (default_run / name).read_bytes() for name in ("train.jsonl", "validation.jsonl")}
    first_sent = _report(default_run)["teacher_requests"]["sent"]
    build_demos.main(["--preset", "paper", "--world", str(world_dir), "--out", str(default_run)])
    report = _report(default_run)
    assert first_sent > 0 and report["teacher_requests"]["sent"] == 0
    assert report["teacher_requests"]["from_cache"] >= first_sent
    for name, data in before.items():
        assert (default_run / name).read_bytes() == data, name


# ----------------------------------------------------------------------------- faults


def _conversation(text: str) -> str:
    """The dialogue inside a recommendation or judge prompt."""
    conv = text.split(CONVERSATION_MARKER, 1)[1]
    return conv.split(" Here are the movie candidates:", 1)[0]


def _fault(conversation: str) -> int:
    return zlib.crc32(conversation.encode("utf-8")) % 6


class FlakyTeacher:
    """The sandbox teacher behind a bad connection, chosen per conversation by ``_fault``:
    0: every list request fails (HTTP 500);   1: the judge only ever answers garbage;
    2: the first list reply is empty, the next one truncated mid-line;  3: the first list reply is garbage."""

    def __init__(self, world):
        self.sim = SandboxTeacher(world)
        self.calls = Counter()

    def chat(self, messages):
        text = messages[-1]["content"]
        if text.startswith("Summarize the metadata"):
            return self.sim.chat(messages)
        judge = "Here are the movie candidates:" in text
        fault = _fault(_conversation(text))
        self.calls[text] += 1
        if judge:
            return "I would rather not rate these." if fault == 1 else self.sim.chat(messages)
        if fault == 0:
            raise TeacherError("HTTP 500 from the teacher")
        if fault == 2:
            return "" if self.calls[text] == 1 else self.sim.chat(messages)[:150]
        if fault == 3 and self.calls[text] == 1:
            return "<html>Service Unavailable</html>"
        return self.sim.chat(messages)


def test_a_failing_teacher_gives_counted_skips_and_demonstrations_for_the_others(world_dir, world, tmp_path):
    cfg = _config(world_dir, tmp_path / "out")
    report = build_demos.build_demos(cfg, teacher=ChatTeacher(FlakyTeacher(world), "flaky"), log=lambda s: None)
    train_all = load_examples(world_dir / "train.jsonl")
    selected = [train_all[i] for i in train_subset(len(train_all), 0.25, 0, seed=0)]
    val = load_examples(world_dir / "validation.jsonl")
    faults = {ex.id: _fault(ex.conversation) for ex in selected + val}
    assert set(faults.values()) >= {0, 1, 2, 3}
    f = report["failures"]
    assert f["teacher_list"] == sum(v == 0 for v in faults.values()) > 0
    assert f["judge"] == sum(v == 1 for v in faults.values()) > 0
    assert any("HTTP 500" in reason for reason in f["reasons"])
    kept = {**_completions(tmp_path / "out" / "train.jsonl"), **_completions(tmp_path / "out" / "validation.jsonl")}
    assert set(kept) == {i for i, v in faults.items() if v not in (0, 1)}
    skipped = report["skipped_ids"]["train"] + report["skipped_ids"]["validation"]
    assert sorted(skipped) == sorted(i for i, v in faults.items() if v in (0, 1))
    for text in kept.values():
        items = parse_recommendations(text)
        assert len(items) == 20 and all(it.exact for it in items)
    assert report["checks"]["format_valid"] == report["checks"]["in_catalog"] == len(kept)


class Interrupted(KeyboardInterrupt):
    pass


class DyingTeacher:
    """The sandbox teacher, killed (an interrupt) at its ``die_at``-th recommendation request."""

    def __init__(self, world, die_at: int | None = None):
        self.sim, self.die_at, self.lists = SandboxTeacher(world), die_at, 0

    def chat(self, messages):
        if "Here is the conversation:" in messages[-1]["content"] and "movie candidates" not in messages[-1]["content"]:
            self.lists += 1
            if self.lists == self.die_at:
                raise Interrupted
        return self.sim.chat(messages)


def test_a_killed_run_writes_no_output_and_resumes_from_the_cache(world_dir, world, tmp_path):
    out = tmp_path / "out"
    cfg = _config(world_dir, out, train_fraction=0.1)
    with pytest.raises(Interrupted):
        build_demos.build_demos(cfg, teacher=ChatTeacher(DyingTeacher(world, die_at=31), "sbx"), log=lambda s: None)
    assert not any((out / name).exists() for name in OUTPUTS)
    assert len((out / "cache" / "teacher.jsonl").read_text().splitlines()) == 30
    survivor = DyingTeacher(world)
    report = build_demos.build_demos(cfg, teacher=ChatTeacher(survivor, "sbx"), log=lambda s: None)
    n = report["counts"]["train"]["selected"] + report["counts"]["validation"]["selected"]
    assert survivor.lists == n - 30 and report["teacher_requests"]["from_cache"] == 30
    assert report["checks"]["format_valid"] == n
    assert all((out / name).is_file() for name in OUTPUTS)


def test_conversations_without_ground_truth_still_get_demonstrations(world_dir, tmp_path):
    rows = [json.loads(line) for line in (world_dir / "validation.jsonl").read_text().splitlines()]
    for j, row in enumerate(rows):
        if j % 2:
            row.pop("groundtruth_with_release_year")
            row.pop("num_groundtruth", None)
        elif j % 3 == 0:
            row["groundtruth_with_release_year"] = [["A Film Nobody Made", 1999]]  # not in the catalog
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_demos.build_demos(
        _config(world_dir, tmp_path / "out", train_data=str(data), train_fraction=1.0, report_train=0),
        log=lambda s: None)
    assert report["counts"]["train"]["demonstrations"] == len(rows)
    assert report["failures"]["groundtruth_not_in_catalog"] == len(range(0, len(rows), 6))
    assert 0 < report["rra"]["adjust_conversations"] < len(rows)
    assert report["checks"]["format_valid"] == report["checks"]["demonstrations"]


# ----------------------------------------------------------------------------- ablations


def test_ablation_switches_change_the_demonstrations_and_the_stages(default_run, world_dir, tmp_path):
    cache = str(default_run / "cache")  # the same teacher: every reply is cached already
    runs = {"full": default_run}
    for flag in ("--no-reflect", "--no-remap-reflect", "--no-adjust"):
        runs[flag] = tmp_path / flag.strip("-")
        build_demos.main(["--preset", "paper", "--world", str(world_dir), "--out", str(runs[flag]), "--cache-dir",
                          cache, flag])
    reports = {name: _report(out) for name, out in runs.items()}
    demos = {name: _completions(out / "validation.jsonl") for name, out in runs.items()}
    assert [reports[n]["stages"] for n in runs] == [["raw", "remap", "reflect", "adjust"], ["raw", "remap", "adjust"],
                                                    ["raw", "identity", "adjust"], ["raw", "remap", "reflect"]]
    assert [reports[n]["demonstration_stage"] for n in runs] == ["adjust", "adjust", "adjust", "reflect"]
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert demos[a] != demos[b], (a, b)
    for name in names:  # every variant still writes N catalog titles per conversation
        c = reports[name]["checks"]
        assert c["format_valid"] == c["in_catalog"] == c["demonstrations"] > 0
        assert reports[name]["teacher_requests"]["sent"] == 0
    val = {name: reports[name]["metrics"]["validation"] for name in names}
    # shared stages are the same computation
    assert val["--no-reflect"]["remap"] == val["full"]["remap"]
    assert val["--no-adjust"]["reflect"] == val["full"]["reflect"]
    assert val["--no-adjust"]["raw"] == val["full"]["raw"] == val["--no-remap-reflect"]["raw"]
    # the identity map keeps only the raw list's in-catalog items: in catalog, but short lists
    identity = val["--no-remap-reflect"]["identity"]
    assert identity["in_catalog"]["mean"] == 1.0 and identity["format_valid"]["mean"] < 1.0
    assert reports["--no-remap-reflect"]["rra"].get("ratings", 0) == 0  # no judge
    assert "ratings" not in reports["--no-reflect"]["rra"] and reports["full"]["rra"]["ratings"] > 0
    assert reports["--no-adjust"]["rra"].get("adjust_events") is None


# ----------------------------------------------------------------------------- bad input


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_demos.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--no-remap-reflect", "--no-reflect", "--no-adjust", "--train-fraction", "--max-train", "--threads",
                 "--teacher", "--base-url", "--api-key-env", "--teacher-model", "--embedder", "--cache-dir"):
        assert flag in text


def test_bad_paths_and_options_fail_before_any_work(world_dir, tmp_path, capsys):
    def fails(argv, pattern):
        assert build_demos.main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err) and err.count("\n") == 1, err

    never = tmp_path / "no_world"
    out = tmp_path / "out"
    common = ["--world", str(never), "--out", str(out)]
    fails(common + ["--train-data", str(tmp_path / "missing.jsonl")], "--train-data .*missing.jsonl: no such file")
    fails(common + ["--catalog", str(tmp_path / "nope.pkl")], "--catalog .*nope.pkl: no such file")
    fails(common + ["--embedder", f"hf:{tmp_path / 'no_model'}"], "--embedder hf:")
    fails(common + ["--teacher", "openai"], "--model")
    fails(common + ["--teacher", "hf"], "--teacher-model")
    fails(common + ["--no-remap-reflect", "--no-adjust"], "needs Adjust")
    fails(common + ["--train-fraction", "1.5"], "train-fraction")
    (tmp_path / "a_file").write_text("x")
    fails(common + ["--out", str(tmp_path / "a_file")], "not a directory")
    assert not never.exists() and not out.exists()  # no world was built, nothing was written
    # a malformed examples file: the error names the file and the line, before any teacher request
    bad = tmp_path / "bad.jsonl"
    good = (world_dir / "validation.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n{not json\n")
    fails(["--world", str(world_dir), "--out", str(out), "--val-data", str(bad)], r"bad.jsonl:2: malformed JSON")
    assert not out.exists()
