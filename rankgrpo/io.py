"""Small file helpers shared by every stage: atomic writes, JSONL appends, and the one JSONL reader.

A write goes to a temporary file in the same directory, is flushed and fsync'd, and is
then renamed over the target, so a reader (or a resumed run) never sees half a file.

Every input file (examples, catalog, predictions) is read through `read_text_utf8` and
`read_jsonl`, so a file that is not UTF-8 or a malformed line is reported the same way
everywhere: ``FILE:LINE: what is wrong``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterable


class InputFileError(ValueError):
    """A user's input file cannot be read as it must be; the message starts with ``FILE`` or
    ``FILE:LINE``. The scripts turn it into one ``error:`` line and exit status 2."""


def read_text_utf8(path: str | Path, error: type[InputFileError] = InputFileError) -> str:
    """The whole file as text. A byte sequence that is not UTF-8 raises ``error`` (a subclass of
    `InputFileError`) naming the file and the line it is on; a leading byte-order mark is dropped."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                             "save the file as UTF-8") from None


@dataclass(frozen=True)
class JsonlLine:
    """One non-blank line of a JSONL file: ``value`` is the parsed JSON, or None with ``error``
    saying why the line is not JSON. ``where`` is ``FILE:LINE`` for messages."""

    lineno: int
    where: str
    value: Any
    error: str | None = None


def read_jsonl(path: str | Path, *, strict: bool = True,
               error: type[InputFileError] = InputFileError) -> list[JsonlLine]:
    """Every non-blank line of a JSONL file, numbered from 1.

    ``strict``: a malformed line raises ``error`` (``FILE:LINE: malformed JSON (...)``);
    otherwise it is returned with its ``error`` field set, for callers that count and skip bad
    rows (the catalog). Text that is not UTF-8 always raises (`read_text_utf8`). ``error`` is the
    caller's subclass of `InputFileError` (`rankgrpo.data.DataError`, `rankgrpo.catalog.CatalogError`).

    >>> # a file with lines '{"a": 1}', '', '{oops' -> strict=False gives
    >>> # [JsonlLine(1, 'f:1', {'a': 1}), JsonlLine(3, 'f:3', None, "malformed JSON (...)")]
    """
    out = []
    for lineno, line in enumerate(read_text_utf8(path, error).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            out.append(JsonlLine(lineno, where, json.loads(line)))
        except json.JSONDecodeError as e:
            why = f"malformed JSON ({e.msg} at column {e.colno})"
            if strict:
                raise error(f"{where}: {why}") from None
            out.append(JsonlLine(lineno, where, None, why))
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line and flush it to disk (metric logs, caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_tolerant(path: str | Path) -> list[dict]:
    """Read a JSONL file written by ``append_jsonl``; a torn last line (a killed run) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: malformed JSON line") from None
    return rows
