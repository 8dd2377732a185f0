"""The item catalog C: loading, title normalisation and year-tolerant lookup.

Formats (``load_catalog`` picks by extension):

* ``.jsonl`` -- one object per line, ``{"title": str, "year": int, ...metadata}``;
  optional metadata fields (``keywords``, ``plot``, ``genres``, ``director``,
  ``popularity``) are kept in ``CatalogItem.meta``.
* ``.tsv``   -- a header line containing ``title`` and ``year`` columns; further
  columns become metadata.
* ``.pkl``   -- the authors' ``gt_catalog.pkl``: a pickled list of ``(title, int year)``.
  It is read through a restricted unpickler that admits only list / tuple / str /
  int / float / set and refuses every other class, so loading it never executes code.

Rows are validated: a missing title, a year that is not an integer, or an impossible
year (the authors' catalog holds ``('The Wall', 201)``) is reported with a count and
dropped, as are exact duplicates. ``Catalog.report`` keeps the counts and the first
few offending rows.

Lookups are dictionary based, O(1) per query (a million items load in seconds).
"""
from __future__ import annotations

import csv
import io
import pickle
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from rankgrpo.io import InputFileError, read_jsonl, read_text_utf8

MIN_YEAR = 1870
MAX_YEAR = 2100

_WS = re.compile(r"\s+")


def normalize_title(title: str) -> str:
    """The one title normalisation used everywhere (catalog, rewards, metrics, seen filter).

    Unicode NFKC, whitespace runs collapsed to one space, stripped, casefolded.

    >>> normalize_title("  The  Lord of the Rings:\\tThe Two Towers ")
    'the lord of the rings: the two towers'
    >>> normalize_title("Amélie") == normalize_title("AME\\u0301LIE")
    True
    """
    return _WS.sub(" ", unicodedata.normalize("NFKC", title)).strip().casefold()


def year_offsets(tolerance: int) -> list[int]:
    """Offsets tried by a year-tolerant lookup, exact year first: 0, +1, -1, +2, -2, ...

    This is the order of the authors' reward (``metrics_align.py``).

    >>> year_offsets(2)
    [0, 1, -1, 2, -2]
    """
    out = [0]
    for d in range(1, tolerance + 1):
        out += [d, -d]
    return out


def is_plausible_year(year: object) -> bool:
    return isinstance(year, int) and not isinstance(year, bool) and MIN_YEAR <= year <= MAX_YEAR


class CatalogError(InputFileError):
    """A catalog file that cannot be used (unreadable, empty, unsafe pickle, bad header)."""


@dataclass(frozen=True)
class CatalogItem:
    title: str
    year: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return f"{self.title} ({self.year})"


@dataclass
class CatalogReport:
    """What loading dropped: counts by reason and the first few rows of each."""

    n_rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.n_rows} rows, none dropped"
        parts = ", ".join(f"{n} {reason} (e.g. {self.examples[reason][0]})" for reason, n in self.dropped.items())
        return f"{self.n_rows} rows; dropped {sum(self.dropped.values())}: {parts}"


class Catalog:
    """An ordered, de-duplicated list of ``CatalogItem`` with O(1) lookups.

    ``items[i]`` is catalog item ``i``; the same index is used by score vectors over C
    (Remap/Reflect/Adjust) and by ``lookup``.
    """

    def __init__(self, items: Iterable[CatalogItem], report: CatalogReport | None = None):
        self.items: list[CatalogItem] = []
        self.report = report or CatalogReport()
        self._by_key: dict[tuple[str, int], int] = {}
        self._by_title: dict[str, list[int]] = {}
        # The authors' evaluation looks up raw strings (libs/metrics.py, evaluate/); these sets hold every
        # loaded row, also the case variants that the normalised index keeps only once.
        self._exact: set[tuple[str, int]] = set()
        self._years_by_lower: dict[str, set[int]] = {}
        for item in items:
            self._exact.add((item.title, item.year))
            self._years_by_lower.setdefault(item.title.lower(), set()).add(item.year)
            key = (normalize_title(item.title), item.year)
            if key in self._by_key:
                self.report.drop("duplicate", str(item))
                continue
            self._by_key[key] = len(self.items)
            self._by_title.setdefault(key[0], []).append(len(self.items))
            self.items.append(item)
        if not self.items:
            raise CatalogError("the catalog is empty (no usable rows)")

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[CatalogItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> CatalogItem:
        return self.items[i]

    def lookup(self, title: str, year: int | None, tolerance: int = 2) -> int | None:
        """Index of the catalog item named ``title`` whose year is nearest within ``tolerance``.

        Tries the exact year first, then +1, -1, +2, -2 (``year_offsets``). ``year=None``
        (a line without a year) never matches.
        """
        if year is None:
            return None
        norm = normalize_title(title)
        if norm not in self._by_title:
            return None
        for d in year_offsets(tolerance):
            idx = self._by_key.get((norm, year + d))
            if idx is not None:
                return idx
        return None

    def contains_exact(self, title: str, year: int | None) -> bool:
        """The authors' ``remove_gt_catalog``: the exact ``(title, int year)`` tuple is a row.

        No normalisation, no year tolerance: ``("heat", 1995)`` and ``("Heat", 1996)`` are not
        ``("Heat", 1995)``. Titles are compared as loaded (rows are stripped of surrounding space).
        """
        return year is not None and (title, year) in self._exact

    def contains_lowercase(self, title: str, year: int | None, tolerance: int = 2) -> bool:
        """The authors' in-catalog test (``eval_grpo_val.py``): ``title.lower()`` equals a lower-cased
        catalog title whose year is within ``tolerance``."""
        if year is None:
            return False
        years = self._years_by_lower.get(title.lower(), ())
        return any(abs(year - y) <= tolerance for y in years)

    def contains(self, title: str, year: int | None, tolerance: int = 0) -> bool:
        return self.lookup(title, year, tolerance) is not None

    def has_title(self, title: str) -> bool:
        return normalize_title(title) in self._by_title

    def indices_of_title(self, title: str) -> list[int]:
        return list(self._by_title.get(normalize_title(title), ()))


# ----------------------------------------------------------------------------- loading


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only builtins.list/tuple/str/int/float/set/frozenset; refuses everything else.

    Lists, tuples, str, int and float are encoded by pickle opcodes without any class
    lookup; a class lookup (``find_class``) happens only for other types. We allow the
    few harmless container builtins a catalog could use and refuse the rest before
    anything is constructed.
    """

    _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"),
                ("builtins", "tuple"), ("builtins", "str"), ("builtins", "int"), ("builtins", "float")}

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise CatalogError(f"refusing to unpickle {module}.{name}: a catalog pickle may hold only "
                           "lists/tuples/sets of (str title, int year)")


def _row_to_item(title, year, meta: dict, where: str, report: CatalogReport) -> CatalogItem | None:
    report.n_rows += 1
    if not isinstance(title, str) or not title.strip():
        report.drop("missing title", where)
        return None
    if isinstance(year, str) and year.strip().lstrip("-").isdigit():
        year = int(year.strip())
    if isinstance(year, float) and year.is_integer():
        year = int(year)
    if not isinstance(year, int) or isinstance(year, bool):
        report.drop("non-integer year", where)
        return None
    if not is_plausible_year(year):
        report.drop("impossible year", where)
        return None
    return CatalogItem(title.strip(), year, meta)


def _load_pickle(path: Path, report: CatalogReport) -> list[CatalogItem]:
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f).load()
        except CatalogError as e:
            raise CatalogError(f"{path}: {e}") from None
        except Exception as e:  # truncated or not a pickle
            raise CatalogError(f"{path}: not a readable catalog pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, (list, tuple, set, frozenset)):
        raise CatalogError(f"{path}: expected a list of (title, year) pairs, got {type(obj).__name__}")
    rows = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
    out = []
    for i, row in enumerate(rows):
        where = f"{path}[{i}] {row!r}"
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            report.n_rows += 1
            report.drop("not a (title, year) pair", where)
            continue
        item = _row_to_item(row[0], row[1], {}, where, report)
        if item:
            out.append(item)
    return out


def _load_jsonl(path: Path, report: CatalogReport) -> list[CatalogItem]:
    out = []
    for line in read_jsonl(path, strict=False, error=CatalogError):
        obj, where = line.value, line.where
        if line.error is not None:
            report.n_rows += 1
            report.drop("malformed JSON", f"{where} ({line.error.removeprefix('malformed JSON ')})")
            continue
        if not isinstance(obj, dict):
            report.n_rows += 1
            report.drop("not an object", where)
            continue
        meta = {k: v for k, v in obj.items() if k not in ("title", "year")}
        item = _row_to_item(obj.get("title"), obj.get("year"), meta, where, report)
        if item:
            out.append(item)
    return out


def _load_tsv(path: Path, report: CatalogReport) -> list[CatalogItem]:
    text = read_text_utf8(path, CatalogError)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    if not reader.fieldnames or "title" not in reader.fieldnames or "year" not in reader.fieldnames:
        raise CatalogError(f"{path}:1: a TSV catalog needs a header line with 'title' and 'year' columns")
    out = []
    for lineno, row in enumerate(reader, 2):
        meta = {k: v for k, v in row.items() if k not in ("title", "year") and k is not None}
        item = _row_to_item(row.get("title"), row.get("year"), meta, f"{path}:{lineno}", report)
        if item:
            out.append(item)
    return out


def load_catalog(path: str | Path) -> Catalog:
    """Load a catalog from ``.jsonl``, ``.tsv`` or the authors' ``.pkl`` (see module doc).

    Raises ``CatalogError`` for a missing file, an unsafe pickle or an empty catalog;
    bad rows are dropped and counted in ``catalog.report``.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found")
    report = CatalogReport()
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        items = _load_pickle(path, report)
    elif suffix in (".jsonl", ".json"):
        items = _load_jsonl(path, report)
    elif suffix in (".tsv", ".txt"):
        items = _load_tsv(path, report)
    else:
        raise CatalogError(f"{path}: unknown catalog format {suffix!r} (use .jsonl, .tsv or .pkl)")
    try:
        return Catalog(items, report)
    except CatalogError as e:
        raise CatalogError(f"{path}: {e}; {report.summary()}") from None
