"""Example records, loading with file/line-numbered errors, the paper's prompt, chat templating.

An example (one JSON object per line, interoperable with the authors' released data):

* ``prompt``: a list of chat messages (``[{"role": "user", "content": ...}]``) or a string;
* ``completion`` (optional): same shapes; the demonstration or a model's list;
* ``seen_titles``: titles mentioned in the conversation (no years);
* ``groundtruth_with_release_year``: ``[[title, year], ...]``; the year may be a string
  ("1984") or an int and is normalised to int here;
* ``id`` (optional): a stable identifier (the line number is used otherwise).

What loading does with bad input (one rule, the same in every script):

* A record that is not what the format says -- malformed JSON, a missing ``prompt``, a
  field of the wrong type, a ground-truth year that is not an integer ("abc", null) --
  stops loading with a ``DataError`` naming the file, the line (or dataset row) and the field.
* A well-formed record with a doubtful *value* is kept and counted in the load report
  (``ExampleList.report``): a ground-truth year outside [1870, 2100] (the authors' data
  holds ``("The Wall", "201")``) stays in the ground truth as it is, so |GT|, the
  denominator of Recall and NDCG, is the authors' ``num_groundtruth``. No parsed
  recommendation carries such a year, so the entry is never a hit.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankgrpo.catalog import is_plausible_year
from rankgrpo.io import InputFileError, read_jsonl, read_text_utf8

N_ITEMS = 20

PROMPT_TEMPLATE = (
    "Pretend you are a movie recommender system.\n"
    "I will give you a conversation between a user and you (a recommender system). "
    "Based on the conversation, you need to reply with {n_items} recommendations. "
    "List the standardized English title of each movie in each line in the form of "
    '"movie name" (release_year) with NO extra words or sentences.\n'
    "Here is the conversation: {context}"
)
CONVERSATION_MARKER = "Here is the conversation: "


class DataError(InputFileError):
    """Bad example data; the message names the file, the line and the field."""


DATA_EXTRA_HINT = "pip install 'rankgrpo[data]'"


@dataclass
class DataReport:
    """What loading kept but flagged: counts by reason and the first few places of each."""

    n_rows: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def count(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < 5:
            seen.append(where)

    def summary(self) -> str:
        if not self.counts:
            return f"{self.n_rows} rows, nothing flagged"
        parts = ", ".join(f"{n} {reason} (e.g. {self.examples[reason][0]})" for reason, n in self.counts.items())
        return f"{self.n_rows} rows; {parts}"

    def to_json(self) -> dict:
        return {"rows": self.n_rows, "counts": dict(self.counts), "examples": self.examples}


class ExampleList(list):
    """The examples of one file, in file order, with the load report in ``.report``."""

    def __init__(self, examples=(), report: DataReport | None = None):
        super().__init__(examples)
        self.report = report or DataReport()


def build_prompt(conversation: str, n_items: int = N_ITEMS) -> str:
    """The paper's recommendation prompt (App. D.1), with the dialogue substituted.

    >>> build_prompt("USER: Something like Alien?\\n").splitlines()[-1]
    'Here is the conversation: USER: Something like Alien?'
    """
    return PROMPT_TEMPLATE.format(n_items=n_items, context=conversation)


@dataclass
class Example:
    """One conversation with its ground truth.

    messages:    the prompt as chat messages (a string prompt becomes one user message).
    completion:  the target / generated list text, or None.
    seen_titles: titles the user already mentioned.
    groundtruth: [(title, int year)], a multiset (duplicates are kept).
    id:          stable identifier.
    """

    id: str
    messages: list[dict]
    seen_titles: list[str]
    groundtruth: list[tuple[str, int]]
    completion: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The user message content (the full recommendation prompt)."""
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")

    @property
    def conversation(self) -> str:
        """The dialogue inside the prompt (text after 'Here is the conversation: ')."""
        text = self.prompt_text
        i = text.find(CONVERSATION_MARKER)
        return text[i + len(CONVERSATION_MARKER):] if i >= 0 else text

    def to_json(self) -> dict:
        row = {
            "id": self.id,
            "prompt": self.messages,
            "seen_titles": self.seen_titles,
            "groundtruth_with_release_year": [[t, y] for t, y in self.groundtruth],
            "num_groundtruth": len(self.groundtruth),
        }
        if self.completion is not None:
            row["completion"] = [{"role": "assistant", "content": self.completion}]
        row.update(self.extra)
        return row


def _messages(value: Any, where: str, fieldname: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: field '{fieldname}' must be a string or a non-empty list of "
                    "{role, content} messages")


def _completion(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, "completion")
    return "".join(m["content"] for m in msgs if m["role"] == "assistant") or msgs[-1]["content"]


def _year(value: Any, where: str, fieldname: str, report: DataReport | None = None) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: field '{fieldname}' has a boolean year {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DataError(f"{where}: field '{fieldname}' has a year that is not an integer: {value!r}")
    if not is_plausible_year(value) and report is not None:
        report.count("ground-truth year out of range, kept", f"{where} {fieldname}={value}")
    return value


def example_from_json(obj: Any, where: str, default_id: str, require_groundtruth: bool = True,
                      report: DataReport | None = None) -> Example:
    """Validate one record; every error names ``where`` (file:line) and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise DataError(f"{where}: missing field 'prompt'")
    messages = _messages(obj["prompt"], where, "prompt")
    seen = obj.get("seen_titles", [])
    if not isinstance(seen, list) or not all(isinstance(s, str) for s in seen):
        raise DataError(f"{where}: field 'seen_titles' must be a list of strings")
    gt_raw = obj.get("groundtruth_with_release_year")
    if gt_raw is None:
        if require_groundtruth:
            raise DataError(f"{where}: missing field 'groundtruth_with_release_year'")
        gt_raw = []
    if not isinstance(gt_raw, list):
        raise DataError(f"{where}: field 'groundtruth_with_release_year' must be a list of [title, year] pairs, "
                        f"got {type(gt_raw).__name__}")
    gt = []
    for j, pair in enumerate(gt_raw):
        f = f"groundtruth_with_release_year[{j}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise DataError(f"{where}: field '{f}' must be a [title, year] pair, got {pair!r}")
        gt.append((pair[0], _year(pair[1], where, f, report)))
    known = {"prompt", "completion", "seen_titles", "groundtruth_with_release_year", "num_groundtruth", "id"}
    return Example(
        id=str(obj.get("id", default_id)),
        messages=messages,
        seen_titles=list(seen),
        groundtruth=gt,
        completion=_completion(obj.get("completion"), where),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def load_examples(path: str | Path, require_groundtruth: bool = True) -> ExampleList:
    """Load examples from JSONL, a JSON list, a JSON object with a ``samples`` list, or a
    Hugging Face ``save_to_disk`` directory such as the authors' ``sft_dataset/train`` (needs the
    optional extra, ``pip install 'rankgrpo[data]'``).

    Raises ``DataError`` naming the file, line and field of the first malformed record; doubtful
    values are kept and counted in the returned list's ``.report`` (module docstring).
    """
    path = Path(path)
    if path.is_dir():
        return _load_hf_dir(path, require_groundtruth)
    if not path.is_file():
        raise DataError(f"{path}: examples file not found")
    text = read_text_utf8(path, DataError)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the examples file is empty")
    records: list[tuple[str, Any, str]] = []
    if stripped.startswith("[") or (stripped.startswith("{") and path.suffix == ".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(obj, dict):
            if not isinstance(obj.get("samples"), list):
                raise DataError(f"{path}: a JSON object must hold a 'samples' list")
            obj = obj["samples"]
        records = [(f"{path}[{i}]", r, str(i)) for i, r in enumerate(obj)]
    else:
        records = [(line.where, line.value, str(line.lineno - 1)) for line in read_jsonl(path, error=DataError)]
    if not records:
        raise DataError(f"{path}: no examples in the file")
    report = DataReport(n_rows=len(records))
    return ExampleList((example_from_json(r, where, default_id, require_groundtruth, report)
                        for where, r, default_id in records), report)


def _load_hf_dir(path: Path, require_groundtruth: bool) -> ExampleList:
    """A ``Dataset.save_to_disk`` directory (one split); row i is named ``PATH[row i]`` in errors."""
    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if splits:
            raise DataError(f"{path}: holds several splits ({', '.join(splits)}); give one of them, e.g. "
                            f"{path / splits[0]}")
        raise DataError(f"{path}: a directory, but not a Hugging Face save_to_disk dataset (no state.json); "
                        "give a JSONL file or a split directory such as sft_dataset/train")
    try:
        import datasets  # the optional 'data' extra
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face save_to_disk directory needs the optional extra: "
                        f"{DATA_EXTRA_HINT} (or export the split to JSONL)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        raise DataError(f"{path}: holds several splits ({splits}); give one of them, e.g. {path / next(iter(ds))}")
    report = DataReport(n_rows=len(ds))
    out = ExampleList(report=report)
    i = 0
    for batch in ds.iter(batch_size=4096):  # column batches: much faster than row-by-row decoding
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            row = dict(zip(columns, values))
            out.append(example_from_json(row, f"{path}[row {i}]", str(i), require_groundtruth, report))
            i += 1
    return out


def write_examples(path: str | Path, examples: list[Example]) -> None:
    """Write examples as JSONL (atomic)."""
    from rankgrpo.io import atomic_write_jsonl

    atomic_write_jsonl(path, [e.to_json() for e in examples])


def chat_prompt_ids(tokenizer, example_or_messages, add_generation_prompt: bool = True,
                    max_prompt_length: int = 0) -> list[int]:
    """Token ids of the prompt rendered with the tokenizer's chat template, ending after the
    assistant header (generation starts there). ``max_prompt_length`` > 0 keeps only the last
    that many tokens (``truncate_left``), as the authors' RL does with 2,048."""
    messages = example_or_messages.messages if isinstance(example_or_messages, Example) else example_or_messages
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)
    ids = list(out["input_ids"])
    return truncate_left(ids, max_prompt_length) if max_prompt_length else ids


def truncate_left(ids: list[int], max_length: int) -> list[int]:
    """The last ``max_length`` ids: a long prompt loses the start of the rendered text (system
    header, instruction, oldest turns) and keeps the assistant header generation starts from.
    This is TRL's ``max_prompt_length`` rule, which the authors' RL ran with (App. C).

    >>> truncate_left([1, 2, 3, 4, 5], 3)
    [3, 4, 5]
    """
    return ids[-max_length:] if len(ids) > max_length else ids
