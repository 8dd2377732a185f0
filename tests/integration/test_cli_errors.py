"""Bad input to the four scripts: each case must exit non-zero with ONE stderr line that names the
file, line or flag at fault, and no traceback. Run in-process through each script's main(argv)."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest

from rankgrpo.data import build_prompt
from rankgrpo.scripts import load_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    return load_script(ROOT / f"{name}.py")


ROW = {"prompt": [{"role": "user", "content": build_prompt("USER: something like Heat?\n")}],
       "completion": [{"role": "assistant", "content": "Heat (1995)\nAlien (1979)"}],
       "seen_titles": ["Ran"], "groundtruth_with_release_year": [["Heat", "1995"]]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good inputs (so each case breaks exactly one thing) and the bad ones the table points at."""
    import torch

    from rankgrpo.models import model_config, model_from_config
    from rankgrpo.sandbox.model import build_tokenizer

    d = tmp_path_factory.mktemp("cli")
    (d / "catalog.jsonl").write_text('{"title": "Heat", "year": 1995}\n{"title": "Alien", "year": 1979}\n')
    (d / "data.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "id": "b"}) + "\n")
    (d / "bad_json.jsonl").write_text(json.dumps(ROW) + "\n" + '{"prompt": "x", \n')
    (d / "bad_year.jsonl").write_text(json.dumps(ROW) + "\n"
                                      + json.dumps({**ROW, "groundtruth_with_release_year": [["Heat", "19xx"]]}))
    (d / "no_prompt.jsonl").write_text(json.dumps({k: v for k, v in ROW.items() if k != "prompt"}) + "\n")
    (d / "no_completion.jsonl").write_text(json.dumps({k: v for k, v in ROW.items() if k != "completion"}) + "\n")
    (d / "bad_seen.jsonl").write_text(json.dumps({**ROW, "seen_titles": "Ran"}) + "\n")
    (d / "empty_catalog.jsonl").write_text('{"title": "Bad", "year": 201}\n')
    (d / "bad_header.tsv").write_text("name\tdate\nHeat\t1995\n")
    (d / "unsafe.pkl").write_bytes(pickle.dumps(Path("x")))
    (d / "catalog.csv").write_text("title,year\nHeat,1995\n")
    (d / "preds_bad.jsonl").write_text('{"id": "0", "text": "Heat (1995)"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n  \n")
    latin1 = json.dumps({**ROW, "seen_titles": ["Am\u00e9lie"]}, ensure_ascii=False).encode("latin-1")
    (d / "latin1.jsonl").write_bytes(json.dumps(ROW).encode() + b"\n" + latin1 + b"\n")
    (d / "latin1_catalog.jsonl").write_bytes('{"title": "Heat", "year": 1995}\n{"title": "Am\u00e9lie", '
                                             '"year": 2001}\n'.encode("latin-1"))
    (d / "latin1_catalog.tsv").write_bytes("title\tyear\nAm\u00e9lie\t2001\n".encode("latin-1"))
    (d / "not_a_dataset").mkdir()
    (d / "not_a_model").mkdir()
    (d / "broken_model").mkdir()
    (d / "broken_model" / "config.json").write_text("{not json")

    tokenizer = build_tokenizer(["Heat (1995)\nAlien (1979)\n", build_prompt("USER: hi\n")] * 4, vocab_size=300)
    template = tokenizer.chat_template
    for name, chat_template in (("model", template), ("no_template", None)):
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(d / name)
        config = model_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=32)
        model_from_config(config).save_pretrained(d / name)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(d / "mismatch")  # a model with fewer embedding rows than the tokenizer
    model_from_config(model_config("qwen2", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                   num_kv_heads=1, intermediate_size=32)).save_pretrained(d / "mismatch")
    (d / "no_results").mkdir()
    torch.set_num_threads(1)
    return d


def sft(d, *extra):
    return ["--model", d / "model", "--train-data", d / "data.jsonl", "--val-data", d / "data.jsonl",
            "--catalog", d / "catalog.jsonl", "--out", d / "runs" / "sft", "--device", "cpu", *extra]


def rl(d, *extra):
    return ["--model", d / "model", "--data", d / "data.jsonl", "--val-data", d / "data.jsonl",
            "--catalog", d / "catalog.jsonl", "--out", d / "runs" / "rl", "--device", "cpu", *extra]


def ev(d, *extra):
    return ["--data", d / "data.jsonl", "--catalog", d / "catalog.jsonl", *extra]


def demos(d, *extra):
    return ["--world", d / "no_world", "--train-data", d / "data.jsonl", "--val-data", d / "data.jsonl",
            "--catalog", d / "catalog.jsonl", "--out", d / "runs" / "demos", *extra]


# (id, script, argv builder, regex the one line must match)
CASES = [
    # ---- flags
    ("rl-steps-negative", "train_rankgrpo", lambda d: rl(d, "--steps", "-3"), r"--steps must be >= 0, got -3"),
    ("rl-group-size-1", "train_rankgrpo", lambda d: rl(d, "--group-size", "1"), r"--group-size must be >= 2"),
    ("rl-temperature-0", "train_rankgrpo", lambda d: rl(d, "--temperature", "0"), r"--temperature must be > 0"),
    ("rl-eps-low", "train_rankgrpo", lambda d: rl(d, "--eps-low", "1.5"), r"--eps-low must be in \[0, 1\)"),
    ("rl-lr-schedule", "train_rankgrpo", lambda d: rl(d, "--lr-schedule", "8000"), r"--lr-schedule: .*STEP:LR"),
    ("rl-beta-nan", "train_rankgrpo", lambda d: rl(d, "--beta", "nan"), r"--beta must be a number"),
    ("rl-max-prompt-length", "train_rankgrpo", lambda d: rl(d, "--max-prompt-length", "-1"),
     r"--max-prompt-length must be >= 0"),
    ("rl-gamma-exp", "train_rankgrpo", lambda d: rl(d, "--reward", "exp"), r"--reward exp needs --gamma > 1"),
    ("rl-fsdp-compile", "train_rankgrpo", lambda d: rl(d, "--fsdp", "--compile"), r"--compile with --fsdp"),
    ("rl-constrained-compile", "train_rankgrpo", lambda d: rl(d, "--constrained", "--compile"),
     r"--constrained does not work with --compile"),
    ("sft-fsdp-no-torchrun", "train_sft", lambda d: sft(d, "--fsdp"), r"--fsdp shards .* start the script with torchrun"),
    ("rl-not-an-int", "train_rankgrpo", lambda d: rl(d, "--steps", "ten"), r"argument --steps: invalid int"),
    ("rl-unknown-flag", "train_rankgrpo", lambda d: rl(d, "--stepz", "3"), r"unrecognized arguments: --stepz"),
    ("sft-eval-every", "train_sft", lambda d: sft(d, "--eval-every", "-1"), r"--eval-every must be >= 0"),
    ("sft-save-every", "train_sft", lambda d: sft(d, "--save-every", "-5"), r"--save-every must be >= 0"),
    ("sft-warmup", "train_sft", lambda d: sft(d, "--warmup-ratio", "2"), r"--warmup-ratio must be <= 1"),
    ("sft-max-length", "train_sft", lambda d: sft(d, "--max-length", "-2"), r"--max-length must be >= 0"),
    ("sft-lr", "train_sft", lambda d: sft(d, "--lr=-1e-5"), r"--lr must be >= 0"),
    ("sft-preset", "train_sft", lambda d: sft(d, "--preset", "huge"), r"argument --preset: invalid choice"),
    ("eval-limit", "evaluate", lambda d: ev(d, "--predictions-from-field", "completion", "--limit", "-1"),
     r"--limit must be >= 0"),
    ("eval-constrained-compile", "evaluate", lambda d: ev(d, "--model", d / "model", "--constrained", "--compile"),
     r"--constrained does not work with --compile"),
    ("eval-constrained-no-model", "evaluate", lambda d: ev(d, "--predictions-from-field", "completion",
                                                            "--constrained"), r"--constrained needs --model"),
    ("eval-two-sources", "evaluate", lambda d: ev(d, "--predictions-from-field", "completion", "--model", "x"),
     r"exactly one of --model"),
    ("eval-max-new-tokens", "evaluate", lambda d: ev(d, "--model", d / "model", "--max-new-tokens", "0"),
     r"--max-new-tokens must be >= 1"),
    ("eval-dtype", "evaluate", lambda d: ev(d, "--model", d / "model", "--dtype", "float8"), r"--dtype: unknown"),
    ("demos-threads", "build_demos", lambda d: demos(d, "--threads", "0"), r"--threads must be >= 1"),
    ("demos-fraction", "build_demos", lambda d: demos(d, "--train-fraction", "1.5"), r"--train-fraction must be"),
    ("demos-adjust-lr", "build_demos", lambda d: demos(d, "--adjust-lr", "0"), r"--adjust-lr must be > 0"),
    ("demos-openai", "build_demos", lambda d: demos(d, "--teacher", "openai"), r"--teacher openai needs --model"),
    # ---- files and directories
    ("eval-model-missing", "evaluate", lambda d: ev(d, "--model", d / "nope"), r"--model \S*nope: no such directory"),
    ("eval-model-hub-offline", "evaluate", lambda d: ev(d, "--model", "someorg/somemodel"),
     r"--model someorg/somemodel: no such directory \(HF_HUB_OFFLINE"),
    ("eval-data-missing", "evaluate", lambda d: ["--data", d / "nope.jsonl", "--catalog", d / "catalog.jsonl",
                                                 "--predictions-from-field", "completion"],
     r"--data \S*nope.jsonl: no such file"),
    ("eval-predictions-missing", "evaluate", lambda d: ev(d, "--predictions", d / "nope.jsonl"),
     r"--predictions \S*nope.jsonl: no such file"),
    ("eval-compare-missing", "evaluate", lambda d: ["--compare", d / "no_results"], r"no_results/results.json"),
    ("sft-train-missing", "train_sft", lambda d: sft(d, "--train-data", d / "nope.jsonl"), r"--train-data \S*nope"),
    ("rl-catalog-missing", "train_rankgrpo", lambda d: rl(d, "--catalog", d / "nope.pkl"), r"--catalog \S*nope.pkl"),
    ("demos-embedder-missing", "build_demos", lambda d: demos(d, "--embedder", f"hf:{d / 'no_encoder'}"),
     r"--embedder hf:\S*no_encoder"),
    ("sft-data-dir-not-dataset", "train_sft", lambda d: sft(d, "--train-data", d / "not_a_dataset"),
     r"not_a_dataset: a directory, but not a Hugging Face save_to_disk dataset"),
    # ---- data rows
    ("sft-malformed-json", "train_sft", lambda d: sft(d, "--train-data", d / "bad_json.jsonl"),
     r"bad_json.jsonl:2: malformed JSON"),
    ("rl-bad-year", "train_rankgrpo", lambda d: rl(d, "--data", d / "bad_year.jsonl"),
     r"bad_year.jsonl:2: field 'groundtruth_with_release_year\[0\]' has a year that is not an integer"),
    ("eval-no-prompt", "evaluate", lambda d: ["--data", d / "no_prompt.jsonl", "--catalog", d / "catalog.jsonl",
                                              "--predictions-from-field", "completion"],
     r"no_prompt.jsonl:1: missing field 'prompt'"),
    ("demos-bad-seen", "build_demos", lambda d: demos(d, "--val-data", d / "bad_seen.jsonl"),
     r"bad_seen.jsonl:1: field 'seen_titles' must be a list"),
    ("sft-no-completion", "train_sft", lambda d: sft(d, "--train-data", d / "no_completion.jsonl"),
     r"no_completion.jsonl: 1 example\(s\) without 'completion'"),
    ("eval-bad-predictions", "evaluate", lambda d: ev(d, "--predictions", d / "preds_bad.jsonl"),
     r"preds_bad.jsonl:1: missing field 'completion'"),
    # ---- empty files and files that are not UTF-8, in every script that reads one
    ("eval-data-empty", "evaluate", lambda d: ["--data", d / "empty.jsonl", "--catalog", d / "catalog.jsonl",
                                               "--predictions-from-field", "completion"],
     r"empty.jsonl: the examples file is empty"),
    ("sft-data-blank", "train_sft", lambda d: sft(d, "--train-data", d / "blank.jsonl"),
     r"blank.jsonl: the examples file is empty"),
    ("rl-val-data-empty", "train_rankgrpo", lambda d: rl(d, "--val-data", d / "empty.jsonl"),
     r"empty.jsonl: the examples file is empty"),
    ("demos-data-empty", "build_demos", lambda d: demos(d, "--train-data", d / "empty.jsonl"),
     r"empty.jsonl: the examples file is empty"),
    ("eval-predictions-empty", "evaluate", lambda d: ev(d, "--predictions", d / "empty.jsonl"),
     r"empty.jsonl: the predictions file is empty"),
    ("eval-data-latin1", "evaluate", lambda d: ["--data", d / "latin1.jsonl", "--catalog", d / "catalog.jsonl",
                                                "--predictions-from-field", "completion"],
     r"latin1.jsonl:2: not UTF-8 text"),
    ("sft-data-latin1", "train_sft", lambda d: sft(d, "--val-data", d / "latin1.jsonl"), r"latin1.jsonl:2: not UTF-8"),
    ("rl-data-latin1", "train_rankgrpo", lambda d: rl(d, "--data", d / "latin1.jsonl"), r"latin1.jsonl:2: not UTF-8"),
    ("demos-data-latin1", "build_demos", lambda d: demos(d, "--val-data", d / "latin1.jsonl"),
     r"latin1.jsonl:2: not UTF-8"),
    ("eval-predictions-latin1", "evaluate", lambda d: ev(d, "--predictions", d / "latin1.jsonl"),
     r"latin1.jsonl:2: not UTF-8"),
    ("rl-catalog-latin1", "train_rankgrpo", lambda d: rl(d, "--catalog", d / "latin1_catalog.jsonl"),
     r"latin1_catalog.jsonl:2: not UTF-8"),
    ("eval-catalog-tsv-latin1", "evaluate", lambda d: ev(d, "--catalog", d / "latin1_catalog.tsv",
                                                         "--predictions-from-field", "completion"),
     r"latin1_catalog.tsv:2: not UTF-8"),
    # ---- catalogs
    ("eval-catalog-empty", "evaluate", lambda d: ev(d, "--catalog", d / "empty_catalog.jsonl",
                                                    "--predictions-from-field", "completion"),
     r"empty_catalog.jsonl: the catalog is empty"),
    ("rl-catalog-header", "train_rankgrpo", lambda d: rl(d, "--catalog", d / "bad_header.tsv"), r"bad_header.tsv"),
    ("sft-catalog-unsafe-pickle", "train_sft", lambda d: sft(d, "--catalog", d / "unsafe.pkl"), r"unsafe.pkl"),
    ("demos-catalog-format", "build_demos", lambda d: demos(d, "--catalog", d / "catalog.csv"),
     r"catalog.csv: unknown catalog format"),
    # ---- checkpoints and tokenizers
    ("sft-model-not-a-model", "train_sft", lambda d: sft(d, "--model", d / "not_a_model"),
     r"--model \S*not_a_model: not a model directory \(no config.json\)"),
    ("rl-model-broken-config", "train_rankgrpo", lambda d: rl(d, "--model", d / "broken_model"),
     r"--model \S*broken_model: cannot load"),
    ("sft-tokenizer-mismatch", "train_sft", lambda d: sft(d, "--model", d / "mismatch"),
     r"mismatch: the tokenizer has \d+ tokens but the model's embedding has 64 rows"),
    ("sft-no-chat-template", "train_sft", lambda d: sft(d, "--model", d / "no_template"),
     r"no_template: the tokenizer has no chat template; pass --chat-template chatml"),
    ("eval-chat-template-unknown", "evaluate", lambda d: ev(d, "--model", d / "model", "--chat-template", "alpaca"),
     r"--chat-template alpaca: neither a built-in template \(chatml\) nor an existing file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_what_is_wrong(files, capsys, case):
    _, name, argv, pattern = case
    module = _script(name)
    code = module.main([str(a) for a in argv(files)])
    captured = capsys.readouterr()
    err = captured.err
    assert code not in (0, None), f"exit {code}; stdout {captured.out[-500:]}"
    assert "Traceback" not in err
    # transformers' own progress bars ("Loading weights: 100%|...") are not messages
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    # bad input fails before any work: build_demos reads the files it is given before it would build
    # the missing sandbox world it names (minutes of pretraining)
    assert not (files / "no_world").exists()


def test_the_table_is_broad():
    """At least 25 cases, each script and each kind of input represented."""
    assert len(CASES) >= 25
    assert {c[1] for c in CASES} == {"build_demos", "train_sft", "train_rankgrpo", "evaluate"}


def test_zero_means_off_for_every_every_flag(files, capsys):
    """--eval-every 0 and --save-every 0 are 'off' in both trainers (they used to divide by zero in SFT):
    the run finishes, writes final/ and no checkpoint."""
    d = files
    assert _script("train_sft").main([str(a) for a in sft(d, "--max-steps", "1", "--micro-batch-size", "2",
                                                          "--grad-accum", "1", "--eval-every", "0",
                                                          "--save-every", "0", "--log-every", "0")]) == 0
    assert (d / "runs" / "sft" / "final" / "config.json").is_file()
    assert not (d / "runs" / "sft" / "checkpoints").exists()
    report = json.loads((d / "runs" / "sft" / "data_report.json").read_text())
    assert report["train"]["tokenize"]["kept"] == 2
    assert _script("train_rankgrpo").main([str(a) for a in rl(d, "--steps", "1", "--prompts-per-step", "2",
                                                              "--group-size", "2", "--max-new-tokens", "4",
                                                              "--eval-every", "0", "--save-every", "0",
                                                              "--max-prompt-length", "30")]) == 0
    assert (d / "runs" / "rl" / "final" / "config.json").is_file()
    assert not (d / "runs" / "rl" / "checkpoints").exists()
    # both prompts are longer than 30 tokens: cut from the left, counted in the report and the log
    prompts = json.loads((d / "runs" / "rl" / "data_report.json").read_text())["prompts"]
    assert prompts["tokenised"] == prompts["truncated"] == 2 and prompts["tokens_dropped"] > 0
    log = [json.loads(line) for line in (d / "runs" / "rl" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["prompts_truncated"] == 2
    assert "Traceback" not in capsys.readouterr().err
