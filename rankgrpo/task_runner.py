"""A small dependency-aware runner for the benchmark pipelines: each task is one subprocess (one of
the four scripts with its flags), done when its output file exists, started once the tasks it needs
are done, at most ``jobs`` at a time.

On 2 cores two 1-thread runs of the sandbox's tiny model finish about 1.3x sooner than one 2-thread
run after another, so each task gets ``cpu_count // jobs`` torch threads. A rerun skips the tasks
whose output exists and resumes the rest (the trainers' ``--resume``).

    tasks = [Task("sft", [python, "train_sft.py", ...], Path("runs/x/sft/final/config.json")),
             Task("eval", [python, "evaluate.py", ...], Path("runs/x/eval/results.json"), deps=["sft"])]
    run_tasks(tasks, Path("runs/x"), jobs=2)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rankgrpo.io import atomic_write_json


@dataclass
class Task:
    """One subprocess: done when ``done`` exists; runs after every task in ``deps``."""

    name: str
    cmd: list[str]
    done: Path
    deps: list[str] = field(default_factory=list)
    alone: bool = False  # nothing else can run beside it (everything depends on it): all cores




def run_tasks(tasks: list[Task], out: Path, jobs: int, cwd: Path | None = None) -> dict[str, float]:
    """Run ``tasks`` respecting ``deps``, at most ``jobs`` at once, each logging to OUT/logs/ and
    running with max(1, cpu_count // jobs) torch threads (an ``alone`` task gets every core).
    A failure, or SIGTERM to this process, stops the run and its running tasks (finished tasks are
    kept; rerunning resumes). Returns the wall-clock
    seconds of every task that ran; OUT/stage_seconds.json keeps them across invocations."""
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    done = {t.name for t in tasks if t.done.exists()}
    pending = [t for t in tasks if t.name not in done]
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    t_begin = time.time()
    # `kill` of the runner would otherwise orphan its tasks: SIGTERM unwinds through the finally below
    previous = (signal.signal(signal.SIGTERM, _exit_on_sigterm)
                if threading.current_thread() is threading.main_thread() else None)
    print(f"{len(tasks)} stages, {len(done)} already finished; {jobs} at once, {threads} thread(s) each")
    try:
        while pending or running:
            for t in list(pending):
                if len(running) >= jobs:
                    break
                if all(d in done for d in t.deps):
                    n = max(threads, os.cpu_count() or 1) if t.alone else threads
                    task_env = env | {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
                    log = open(out / "logs" / (t.name.replace("/", "_") + ".log"), "a")
                    log.write(f"$ {' '.join(t.cmd)}\n")
                    log.flush()
                    running[t.name] = (subprocess.Popen(t.cmd, cwd=cwd, env=task_env, stdout=log,
                                                        stderr=subprocess.STDOUT), time.time(), log)
                    pending.remove(t)
                    print(f"[{time.time() - t_begin:6.0f}s] start {t.name}", flush=True)
            time.sleep(0.5)
            for name, (proc, t0, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[name]
                if rc != 0:
                    tail = (out / "logs" / (name.replace("/", "_") + ".log")).read_text()[-3000:]
                    raise SystemExit(f"error: stage {name} failed (exit {rc}); last lines of its log:\n{tail}")
                seconds[name] = time.time() - t0
                done.add(name)
                record_seconds(out, name, seconds[name])
                print(f"[{time.time() - t_begin:6.0f}s] done  {name} ({seconds[name]:.0f}s)", flush=True)
    finally:
        for proc, _, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return seconds


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def record_seconds(out: Path, name: str, seconds: float) -> None:
    """Keep every stage's latest wall-clock in OUT/stage_seconds.json (so --report-only and resumed
    runs still report the time of stages that ran in an earlier invocation)."""
    path = out / "stage_seconds.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_json(path, times | {name: round(seconds, 1)})
