"""Every command the README and docs/ show is run here, with only sizes (steps, rows, tokens,
processes) and the model changed: a command shown but never run is a defect.

The commands are read from the ```bash blocks of README.md and docs/*.md when the tests are
collected, so a command added to the docs is run (or must be exempted below, with the reason and
the place that covers it) without touching this file. Each runs in one prepared project directory
that holds what the documented commands expect to find: the sandbox world in ``sandbox_world/``,
the real-data layout under ``data/`` (the authors' JSONL, ``save_to_disk`` directories and
``gt_catalog.pkl`` pickle, all written from a tiny sandbox world), a sentence encoder where the
commands name one, and an OpenAI-compatible endpoint that answers as the sandbox teacher.

Substitutions, nothing else:
- hub model names -> the tiny sandbox base model (the model path);
- the OpenAI endpoint -> a local server on 127.0.0.1 that answers with the simulated teacher;
- ``$HOME`` -> a home directory inside the project (for the cached encoder and tokenizer paths);
- size flags appended (argparse keeps the last value): ``SIZES`` below; ``--nproc-per-node`` 2.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
pytestmark = pytest.mark.usefixtures("one_thread")

# Flags appended to each program's documented command: sizes only.
SIZES = {
    "build_demos.py": ["--train-fraction", "1", "--max-train", "12", "--report-train", "4", "--n-reflect", "12",
                       "--adjust-steps", "3", "--adjust-batch-size", "8", "--concurrency", "2"],
    "train_sft.py": ["--max-steps", "1", "--epochs", "1", "--micro-batch-size", "2", "--grad-accum", "1",
                     "--eval-every", "0", "--max-new-tokens", "16", "--val-gen-examples", "2"],
    "train_rankgrpo.py": ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "4",
                          "--max-new-tokens", "16", "--eval-every", "0", "--val-examples", "2"],
    "evaluate.py": ["--limit", "4", "--max-new-tokens", "16"],
    "rankgrpo.sandbox": ["--n-films", "200", "--n-train", "24", "--n-validation", "6", "--n-test", "6",
                         "--vocab-size", "600", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
                         "--num-kv-heads", "1", "--intermediate-size", "64", "--pretrain-steps", "2",
                         "--pretrain-batch-size", "2", "--pretrain-seq-len", "64",
                         "--pretrain-chat-questions", "8", "--no-calibrate"],
    "benchmarks/bench_lora_memory.py": ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                                        "--intermediate", "64", "--vocab", "256", "--rows", "2", "--prompt", "8",
                                        "--seq", "8", "--rank", "4", "--steps", "1"],
    "benchmarks/bench_constraint.py": ["--builds", "1", "--check-lists", "4", "--prompts", "2", "--group", "1",
                                       "--new-tokens", "8", "--repeats", "1", "--hidden", "32", "--layers", "1"],
}
SCRIPTS = ("build_demos.py", "train_sft.py", "train_rankgrpo.py", "evaluate.py")
HUB_MODELS = re.compile(r"^(Qwen|meta-llama|HuggingFaceTB)/[\w.-]+$")

# Commands not run here: (pattern, why, where it is covered). Anything else must run.
EXEMPT = [
    (r"^make (test|test-min|test-fast|test-real)$", "the test runners themselves",
     "CI runs make test and make test-min; make test-real is opt-in"),
    (r"^make mutation\b", "13 minutes of CPU (mutmut on the five core modules)",
     "opt-in, not part of make test; scripts/mutation_report.py's score table"),
    (r"^python scripts/mutation_report\.py --report-only", "reads the mutants/ that make mutation leaves",
     "make mutation"),
    (r"^make demo$", "9 minutes of CPU", "each of its stages is one of the four scripts run here; the README "
                                         "names the command and time of the run that made its table"),
    (r"^pip install ", "changes the environment", "the Makefile installs every extra the tests use"),
    (r"^curl ", "downloads from the network", "the tests read a pickle in the authors' format instead"),
    (r"^export ", "sets a variable for the next command", "the next command runs here"),
    (r"^python scripts/fetch_real_assets\.py", "downloads from the package index", "make test-real runs it"),
    (r"python -m pytest ", "runs tests", "the named test files must exist (checked below)"),
    (r"^python benchmarks/paper_tables\.py", "hours of CPU (--quick: minutes)",
     "tests/integration/test_paper_tables.py parses every stage's command as its script would; each report "
     "is made with it, and --quick is run from a fresh clone with it"),
    (r"^python benchmarks/bench_lora_memory\.py", "four child processes per command",
     "tests/integration/test_bench_lora_memory.py runs it at tiny sizes, --json included"),
    (r"^python benchmarks/lora_quality\.py", "48 minutes of CPU",
     "tests/integration/test_lora_quality.py runs it at --quick sizes"),
    (r"^python benchmarks/gpu_check\.py(?! --tiny)", "needs a CUDA GPU",
     "--tiny runs the same path here (tests/integration/test_gpu_check.py)"),
    (r"^python benchmarks/gpu_check\.py --tiny", "about a minute", "tests/integration/test_gpu_check.py runs it"),
    (r"^torchrun --nnodes 2 ", "needs two machines", "the one-node torchrun commands run here"),
    (r"--report-to wandb", "needs a wandb account, or WANDB_MODE=offline, which the export before it sets and "
     "this test does not", "tests/integration/test_tracking.py runs it offline"),
    (r"--catalog \"\$RANKGRPO_REDDIT_CATALOG\" --tokenizer", "needs a real tokenizer and the authors' "
                                                               "catalog", "make test-real"),
]


@dataclass(frozen=True)
class Command:
    where: str   # FILE:LINE of the command's first line
    text: str    # continuation lines joined, comments dropped

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def documented_commands(paths=DOCS) -> list[Command]:
    """Every command line of the ```bash blocks in ``paths``: backslash continuations joined,
    comments and blank lines dropped."""
    out = []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_bash, pending, start = False, "", 0
        for i, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
                continue
            if not in_bash:
                continue
            text = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not pending:
                start = i
            if text.endswith("\\"):
                pending += text[:-1].strip() + " "
                continue
            text = (pending + text.strip()).strip()
            pending = ""
            if text:
                out.append(Command(f"{os.path.relpath(path, ROOT)}:{start}", text))
    return out


def exemption(cmd: Command) -> tuple[str, str] | None:
    for pattern, why, covered in EXEMPT:
        if re.search(pattern, cmd.text):
            return why, covered
    return None


COMMANDS = documented_commands()


def test_commands_are_found_and_the_parser_joins_lines(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\npython a.py --x 1 \\\n    --y 2   # note\n# a comment\n\nmake test\n```\n"
                   "```text\npython not_a_command.py\n```\n")
    assert [c.text for c in documented_commands([doc])] == ["python a.py --x 1 --y 2", "make test"]
    assert len(COMMANDS) >= 25 and any("train_rankgrpo.py" in c.text for c in COMMANDS)


def test_every_exempt_test_command_names_files_that_exist():
    for cmd in COMMANDS:
        if re.search(r"python -m pytest ", cmd.text):
            for arg in cmd.argv:
                if arg.startswith("tests/"):
                    assert (ROOT / arg).exists(), f"{cmd.where}: {arg} does not exist"


# ----------------------------------------------------------------------------- the project


class SandboxChatAPI:
    """An OpenAI-compatible /chat/completions endpoint on 127.0.0.1 answering as the sandbox teacher."""

    def __init__(self, world_dir: Path):
        from rankgrpo.sandbox import SandboxTeacher, load_world

        teacher = SandboxTeacher(load_world(world_dir))

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = teacher.chat(body["messages"])
                data = json.dumps({"id": "x", "model": body["model"], "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data.encode())))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def in_process(script: str, argv: list[str]) -> int:
    return load_script(ROOT / script, f"_documented_{Path(script).stem}").main(argv)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory laid out as the documented commands expect (see the module docstring)."""
    import transformers
    from helpers import TINY

    from rankgrpo.data import load_examples, write_examples
    from rankgrpo.sandbox import build_world

    d = tmp_path_factory.mktemp("project")
    world = d / "sandbox_world"
    build_world(TINY, world)
    home = d / "home"
    cache = home / ".cache" / "rankgrpo"
    for encoder in (d / "models" / "stella_en_400M_v5", cache / "all-minilm-l6-v2"):  # a tiny random encoder
        encoder.mkdir(parents=True)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789()"]
        (encoder / "vocab.txt").write_text("\n".join(vocab))
        transformers.BertTokenizer(str(encoder / "vocab.txt")).save_pretrained(encoder)
        transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32)).save_pretrained(encoder)
    shutil.copytree(world / "base_model", cache / "tokenizers" / "qwen2")
    # the real-data layout, written from the sandbox world in the authors' formats
    data = d / "data"
    data.mkdir()
    catalog = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
    (data / "gt_catalog.pkl").write_bytes(pickle.dumps([(r["title"], int(r["year"])) for r in catalog]))
    for split in ("train", "validation", "test"):
        shutil.copy(world / f"{split}.jsonl", data / f"{split}.jsonl")
        shutil.copy(world / f"{split}.jsonl", d / f"{split}.jsonl")
    shutil.copy(world / "catalog.jsonl", d / "catalog.jsonl")
    import datasets

    processed = data / "processed_datasets"
    rows = {s: [{**e.to_json(), "groundtruth_with_release_year": [[t, str(y)] for t, y in e.groundtruth]}
                for e in load_examples(world / f"{s}.jsonl")] for s in ("train", "validation")}   # years as text
    for s in ("train", "validation"):
        datasets.Dataset.from_list(rows[s]).save_to_disk(str(processed / "sft_dataset" / s))
    datasets.Dataset.from_list(rows["train"]).save_to_disk(str(processed / "grpo" / "grpo_dataset" / "train"))

    api = SandboxChatAPI(world)
    cwd, env = os.getcwd(), dict(os.environ)
    os.chdir(d)
    os.environ.update(HOME=str(home), OPENAI_API_KEY="", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
                      RANKGRPO_REDDIT_SAMPLE=str(data / "train_sample.jsonl"),
                      RANKGRPO_REDDIT_CATALOG=str(data / "gt_catalog.pkl"))
    try:
        # what the plain four-script pipeline leaves behind, for the commands that start from it
        assert in_process("build_demos.py", SIZES["build_demos.py"]) == 0
        demos = load_examples(d / "runs" / "demos" / "train.jsonl")
        write_examples(d / "demos" / "train.jsonl", demos)
        write_examples(data / "train_sample.jsonl", demos)   # rows with completions, as the authors' sample
        shutil.copy(d / "runs" / "demos" / "validation.jsonl", d / "demos" / "validation.jsonl")
        assert in_process("train_sft.py", SIZES["train_sft.py"]) == 0
        assert in_process("train_rankgrpo.py", SIZES["train_rankgrpo.py"]) == 0
        # the demo's layout, for the commands that score its checkpoints
        shutil.copytree(world, d / "runs" / "demo" / "world")
        for run in ("sft", "rankgrpo"):
            shutil.copytree(d / "runs" / run / "final", d / "runs" / "demo" / "seed3407" / run / "final")
        yield {"dir": d, "api": api}
    finally:
        api.close()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)


def resolve(cmd: Command, api_url: str) -> tuple[str, list[str]]:
    """(how to run it, argv): 'script' (one of the four, in this process), 'module', 'torchrun' or
    'python' (a subprocess), with the substitutions of the module docstring applied."""
    argv = ["sandbox_world/base_model" if HUB_MODELS.match(a) else a for a in cmd.argv]
    argv = [os.path.expandvars(os.path.expanduser(a)) for a in argv]
    if "--base-url" in argv:
        argv[argv.index("--base-url") + 1] = api_url
    elif "openai" in argv:
        argv += ["--base-url", api_url]
    if argv[0] == "torchrun":
        if "--nproc-per-node" in argv:
            argv[argv.index("--nproc-per-node") + 1] = "2"
        i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
        return "torchrun", [*argv[1:i], "--standalone", str(ROOT / argv[i]), *argv[i + 1:], *SIZES[argv[i]]]
    assert argv[0] == "python", f"{cmd.where}: no rule runs {cmd.text!r}; run it here or exempt it"
    if argv[1] == "-m":
        subcommand = len(argv) > 3 and not argv[3].startswith("-")   # e.g. rankgrpo.sandbox calibrate
        return "module", [*argv[1:], *([] if subcommand else SIZES.get(argv[2], []))]
    script = argv[1]
    sizes = [] if "--compare" in argv else SIZES.get(script, [])
    if script in SCRIPTS:
        return "script", [script, *argv[2:], *sizes]
    return "python", [str(ROOT / script), *argv[2:], *sizes]


RUN = [pytest.param(c, id=c.where, marks=[pytest.mark.slow] if c.text.startswith("torchrun") else [])
       for c in COMMANDS if exemption(c) is None]


@pytest.mark.parametrize("cmd", RUN)
def test_documented_command_runs(project, cmd, capsys):
    how, argv = resolve(cmd, project["api"].url)
    if how == "script":
        code = in_process(argv[0], argv[1:])
        err = capsys.readouterr().err
        assert code == 0, f"{cmd.where}: {cmd.text}\nexit {code}\n{err[-3000:]}"
        return
    if how == "torchrun":
        full = [sys.executable, "-m", "torch.distributed.run", *argv]
    else:
        full = [sys.executable, *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run(full, cwd=project["dir"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd.where}: {cmd.text}\n{res.stderr[-3000:]}"
