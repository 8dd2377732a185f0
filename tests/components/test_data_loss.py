"""Nothing is lost silently: SFT and RL prompts are cut from the left (never the completion) and
counted; a doubtful ground-truth year is kept and counted; the authors' save_to_disk splits load as
JSONL does; tokenizers without a chat template get one or a clear error; the template's end-of-turn
token stops generation."""
from __future__ import annotations

import json
import sys

import pytest

from rankgrpo.data import DataError, build_prompt, chat_prompt_ids, load_examples
from rankgrpo.models import ChatTemplateError, end_of_turn_ids, set_chat_template, tiny_model
from rankgrpo.sandbox.model import build_tokenizer
from rankgrpo.models import eos_token_ids
from rankgrpo.sft_data import CompletionTooLong, tokenize_sft, tokenize_sft_split
from rankgrpo.scripts import load_script

LIST = "\n".join(f"Film Number {i} ({1980 + i})" for i in range(20))
CONVERSATION = "USER: " + " ".join(["I liked Heat (1995) and the long heist scenes."] * 30) + "\n"


def row(**extra) -> dict:
    return {"prompt": [{"role": "user", "content": build_prompt(CONVERSATION)}],
            "completion": [{"role": "assistant", "content": LIST}], "seen_titles": ["Heat"],
            "groundtruth_with_release_year": [["Film Number 3", "1983"], ["The Wall", "201"]], **extra}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([build_prompt(CONVERSATION), LIST] * 3, vocab_size=400)


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row()) + "\n")
    return load_examples(path)[0]


# ----------------------------------------------------------------------------- SFT / RL truncation


def test_sft_truncation_cuts_the_prompt_from_the_left_and_keeps_every_target(tokenizer, example):
    full = tokenize_sft(tokenizer, example)
    n_targets = sum(full.labels_mask)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    completion = len(full.input_ids) - full.labels_mask.index(True)
    max_length = completion + 5  # room for 5 prompt tokens
    cut = len(full.input_ids) - max_length
    assert sum(full.labels_mask[:max_length]) < n_targets  # right truncation would have lost targets

    s = tokenize_sft(tokenizer, example, max_length)
    assert len(s.input_ids) == max_length and s.prompt_tokens_dropped == cut
    assert s.input_ids == full.input_ids[cut:] and s.labels_mask == full.labels_mask[cut:]
    assert sum(s.labels_mask) == n_targets
    last_target = max(i for i, m in enumerate(s.labels_mask) if m)
    assert s.input_ids[last_target] == im_end  # the end-of-turn token is still learned
    assert tokenize_sft(tokenizer, example, len(full.input_ids)) == full  # fits: untouched

    with pytest.raises(CompletionTooLong, match="--max-length"):
        tokenize_sft(tokenizer, example, completion)  # no prompt token left to predict the first target


def test_sft_split_counts_shortened_and_skipped_rows(tokenizer, example):
    import dataclasses

    short = dataclasses.replace(example, id="short", messages=[{"role": "user", "content": "Hi"}])
    full = tokenize_sft(tokenizer, example)
    small = tokenize_sft(tokenizer, short)
    long_completion = dataclasses.replace(example, id="huge", completion=LIST + "\n" + LIST)
    max_length = len(small.input_ids)  # the short row fits exactly; the long prompt does not
    assert max_length < len(full.input_ids)
    samples, report = tokenize_sft_split(tokenizer, [example, short, long_completion], max_length)
    assert [len(s.input_ids) for s in samples] == [max_length, len(small.input_ids)]
    assert report == {"rows": 3, "kept": 2, "prompt_truncated": 1,
                      "prompt_tokens_dropped": len(full.input_ids) - max_length,
                      "skipped_completion_too_long": 1, "skipped_ids": ["huge"]}


def test_rl_prompt_keeps_its_last_tokens(tokenizer, example):
    full = chat_prompt_ids(tokenizer, example)
    cut = chat_prompt_ids(tokenizer, example, max_prompt_length=50)
    assert len(full) > 50 and cut == full[-50:]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert cut[-len(header):] == header  # generation still starts after the assistant header
    assert chat_prompt_ids(tokenizer, example, max_prompt_length=len(full) + 1) == full


# ----------------------------------------------------------------------------- ground-truth rows


def test_implausible_groundtruth_year_is_kept_counted_and_loading_goes_on(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row()) + "\n" + json.dumps(row(groundtruth_with_release_year=[["Heat", 1995]])))
    examples = load_examples(path)
    assert len(examples) == 2
    assert examples[0].groundtruth == [("Film Number 3", 1983), ("The Wall", 201)]  # |GT| = num_groundtruth
    assert examples.report.counts == {"ground-truth year out of range, kept": 1}
    assert "d.jsonl:1" in examples.report.examples["ground-truth year out of range, kept"][0]
    assert "1 ground-truth year out of range, kept" in examples.report.summary()


# ----------------------------------------------------------------------------- save_to_disk directories


def test_save_to_disk_split_reads_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional 'data' extra (datasets) is not installed")
    rows = [row(num_groundtruth=2), row(groundtruth_with_release_year=[["Heat", "1995"]], num_groundtruth=1)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft_dataset" / "train"))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    from_dir = load_examples(tmp_path / "sft_dataset" / "train")
    from_jsonl = load_examples(tmp_path / "train.jsonl")
    assert [e.to_json() for e in from_dir] == [e.to_json() for e in from_jsonl]
    assert from_dir.report.counts == from_jsonl.report.counts == {"ground-truth year out of range, kept": 1}

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError, match=r"both: holds several splits \(train, test\); give one of them"):
        load_examples(tmp_path / "both")
    with pytest.raises(DataError, match=r"sft_dataset: holds several splits \(train\); give one of them"):
        load_examples(tmp_path / "sft_dataset")  # split directories saved one by one
    bad = [row(), {**row(), "seen_titles": "Heat"}]
    datasets.Dataset.from_list(bad[1:]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[row 0\]: field 'seen_titles' must be a list"):
        load_examples(tmp_path / "bad")


def test_save_to_disk_split_through_a_script(tmp_path, capsys):
    datasets = pytest.importorskip("datasets", reason="the optional 'data' extra (datasets) is not installed")
    from pathlib import Path

    datasets.Dataset.from_list([row(), row()]).save_to_disk(str(tmp_path / "test"))
    (tmp_path / "catalog.jsonl").write_text('{"title": "Film Number 3", "year": 1983}\n')
    module = load_script(Path(__file__).parents[2] / "evaluate.py", "evaluate_for_hf_dir")
    assert module.main(["--data", str(tmp_path / "test"), "--catalog", str(tmp_path / "catalog.jsonl"),
                        "--predictions-from-field", "completion", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["results"]["n_examples"] == 2


def test_save_to_disk_without_the_extra_names_it(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"needs the optional extra: pip install 'rankgrpo\[data\]'"):
        load_examples(tmp_path / "train")


# ----------------------------------------------------------------------------- chat templates, stop ids


def test_missing_chat_template_is_a_clear_error_and_chatml_fixes_it(tokenizer, example, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template; pass --chat-template chatml"):
        set_chat_template(tok, "", "base")
    set_chat_template(tok, "chatml")
    s = tokenize_sft(tok, example)
    assert s == tokenize_sft(tokenizer, example)  # the sandbox template is ChatML with the same markers
    (tmp_path / "t.jinja").write_text(tokenizer.chat_template)
    tok.chat_template = None
    set_chat_template(tok, str(tmp_path / "t.jinja"))
    assert tok.chat_template == tokenizer.chat_template
    with pytest.raises(ChatTemplateError, match="neither a built-in template"):
        set_chat_template(tok, "alpaca")


def test_chatml_needs_its_markers_in_the_vocabulary(tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"]))
    with pytest.raises(ChatTemplateError, match="has no <|im_start|> / <|im_end|> token"):
        set_chat_template(BertTokenizer(str(tmp_path / "vocab.txt")), "chatml", "bert")


def test_stop_ids_include_the_templates_end_of_turn_token(tokenizer):
    import copy

    base = copy.deepcopy(tokenizer)
    base.eos_token = "<|endoftext|>"  # a base Qwen2.5: eos <|endoftext|>, ChatML turns end with <|im_end|>
    im_end, eot = base.convert_tokens_to_ids("<|im_end|>"), base.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_ids(base) == [im_end]
    model = tiny_model("qwen2", vocab_size=len(base))
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, base) == sorted({im_end, eot})

    base.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})  # a Llama-3 style turn end
    base.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>"
                          "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
    assert end_of_turn_ids(base) == [base.convert_tokens_to_ids("<|eot_id|>")]
    base.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                          "{% if add_generation_prompt %}### assistant: {% endif %}")
    assert end_of_turn_ids(base) == []  # plain text closes the turn: nothing to add
