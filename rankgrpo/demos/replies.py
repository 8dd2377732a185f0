"""Teacher and judge replies -> the inputs of Remap-Reflect-Adjust (§2.2, App. A).

The teacher answers three prompts (``rankgrpo.demos.prompts`` and the recommendation prompt);
each kind of reply is parsed here, and each parser has a ``validate_*`` twin that tells the
teacher's retry loop (``rankgrpo.demos.teacher``) whether a reply is usable at all:

* the raw recommendation list -> ``TeacherItem`` s (``parse_teacher_list``): Remap's input;
* the judge's "movie_name (release_year)####rating" lines -> ``JudgeRatings``
  (``parse_judge_reply``): Reflect's r (Eq. 11);
* the metadata reply -> (keywords, plot) (``parse_metadata_reply``): the text Remap embeds.

Decisions the paper leaves open, made here:

* Teacher list. Lines are parsed with the one parse (``parse_recommendations``); lines
  without a "(YYYY)" are dropped and the remaining items keep their order: the k-th
  parsed item has rank k (1-based) and weight p = 1/sqrt(k). At most ``n_items`` (N)
  items are read; a reply with none is invalid (retried, then a counted failure).
* I_ic, "teacher item u equals catalog item v": the same normalised title
  (``normalize_title``: NFKC, casefold, whitespace) and a year within
  ``identity_year_tolerance`` = 2, the exact year preferred (``Catalog.lookup``). This is
  the rule by which the reward and the metrics decide that a generated item *is* a
  catalog item, so Remap transfers exactly the items the evaluation would count.
* Duplicates. A teacher item is identified by its catalog item when it has one (so
  "Heat (1995)" and "heat (1996)" are one item), else by (normalised title, year). When
  the same item appears at several ranks, only the first (highest) rank counts.
* Judge ratings are matched back to the candidates by normalised title and year (then by
  title alone when unambiguous) and clipped to [-2, 2]; a candidate without a rating gets
  0, and both the missing ratings and the lines that rate nothing are counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from rankgrpo.catalog import Catalog, normalize_title
from rankgrpo.parsing import parse_line, parse_recommendations


# ============================================================================= the teacher's raw list


@dataclass(frozen=True)
class TeacherItem:
    """One unique item of a teacher's raw list.

    rank:          1-based rank k in the raw list (p = 1/sqrt(k)).
    title, year:   as the teacher wrote them.
    catalog_index: the catalog item it equals (I_ic), or None when out of catalog.
    """

    rank: int
    title: str
    year: int
    catalog_index: int | None


def parse_teacher_list(reply: str, catalog: Catalog, max_items: int = 20,
                       year_tolerance: int = 2) -> list[TeacherItem]:
    """The teacher's raw list -> unique ``TeacherItem`` s (see the module docstring for the rules).

    >>> from rankgrpo.catalog import CatalogItem
    >>> cat = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979)])
    >>> [(t.rank, t.title, t.catalog_index) for t in parse_teacher_list(
    ...     "Here you go:\\n1. Heat (1995)\\nAlienn (1979)\\nheat (1996)\\nAlien (1979)", cat)]
    [(1, 'Heat', 0), (2, 'Alienn', None), (4, 'Alien', 1)]
    """
    items = [it for it in parse_recommendations(reply) if it.valid][:max_items]
    out, seen = [], set()
    for rank, it in enumerate(items, 1):
        idx = catalog.lookup(it.title, it.year, year_tolerance)
        key = ("catalog", idx) if idx is not None else ("teacher", normalize_title(it.title), it.year)
        if key not in seen:
            seen.add(key)
            out.append(TeacherItem(rank, it.title, it.year, idx))
    return out


def validate_list_reply(reply: str) -> str | None:
    """A usable raw list has at least one "Title (YYYY)" line."""
    return None if any(it.valid for it in parse_recommendations(reply)) else "no 'Title (YYYY)' line"


# ============================================================================= the judge (Reflect)


_RATING_WORDS = [("not good", -1.0), ("great", 2.0), ("good", 1.0), ("normal", 0.0), ("bad", -2.0)]
_NUMBER = re.compile(r"(?<![\w.])[+\-\u2212\u2013]?\d+(?:\.\d+)?(?![\w.])")
_YEAR_PAREN = re.compile(r"\(\s*\d{4}\s*\)")
_CANONICAL_JUDGE_LINE = re.compile(r"(.+ \(\d{4}\))\s*#{2,}\s*([+-]?\d+(?:\.\d+)?)\s*$")


def parse_judge_line(line: str) -> tuple[str, int | None, float] | None:
    """One judge line -> (title, year or None, rating), or None if it holds no rating.

    The item runs up to the first "(YYYY)" or, in a line without a year, up to the first
    "#"; the rating is the first number after it (or a rating word: great, good, normal,
    not good, bad), whatever separates them ("####" as asked, ":", "-", "|", ...).
    Bullets, numbering, markdown and quotes around the item are stripped.

    >>> parse_judge_line('3. **"Heat (1995)"** #### -1 (not good)')
    ('Heat', 1995, -1.0)
    >>> parse_judge_line("2001: A Space Odyssey (1968): great")
    ('2001: A Space Odyssey', 1968, 2.0)
    >>> parse_judge_line("Here are the ratings:") is None
    True
    """
    year = _YEAR_PAREN.search(line)
    if year is not None:
        item, rest = line[:year.end()], line[year.end():]
    elif "#" in line:
        item, rest = line.split("#", 1)
    else:
        return None
    number = _NUMBER.search(rest)
    if number is not None:
        rating = float(number.group().replace("\u2212", "-").replace("\u2013", "-"))
    else:
        words = rest.casefold()
        rating = next((v for word, v in _RATING_WORDS if word in words), None)
        if rating is None:
            return None
    title, year = parse_line(item.strip().rstrip("*_ :-").strip())
    title = title.strip().strip("*_\"'").strip()
    return (title, year, rating) if title else None


@dataclass
class JudgeRatings:
    """Ratings of the N_r candidates, in candidate order, and how the reply parsed.

    ratings:    [N_r] floats in [-L, L]; 0 for a candidate the reply did not rate.
    n_rated:    candidates with a rating.
    n_missing:  candidates without one (counted as 0).
    n_unparsed: non-empty reply lines that gave no rating for any candidate.
    """

    ratings: list[float]
    n_rated: int
    n_missing: int
    n_unparsed: int


def parse_judge_reply(reply: str, candidates: Sequence[tuple[str, int]], scale: int = 2) -> JudgeRatings:
    """The judge's "movie_name (release_year)####rating" reply -> ``JudgeRatings``.

    A line's item is matched to a candidate by normalised title and exact year, then the
    nearest year within 2, then by title alone if exactly one candidate has it. The first
    rating of a candidate wins; ratings are clipped to [-scale, scale].

    >>> r = parse_judge_reply("Heat (1995)####2\\n- alien (1979) #### 7\\nnonsense", [("Heat", 1995),
    ...                       ("Alien", 1979), ("Ran", 1985)])
    >>> r.ratings, r.n_rated, r.n_missing, r.n_unparsed
    ([2.0, 2.0, 0.0], 2, 1, 1)
    """
    exact = {f"{title} ({year})": i for i, (title, year) in enumerate(candidates)}
    by_title: dict[str, list[int]] = {}
    for i, (title, _) in enumerate(candidates):
        by_title.setdefault(normalize_title(title), []).append(i)
    ratings: list[float | None] = [None] * len(candidates)
    n_unparsed = 0
    for line in reply.splitlines():
        if not line.strip():
            continue
        fast = _CANONICAL_JUDGE_LINE.match(line)  # "Title (YYYY)####r" naming a candidate verbatim
        if fast and fast.group(1) in exact:
            i, parsed = exact[fast.group(1)], (None, None, float(fast.group(2)))
        else:
            parsed = parse_judge_line(line)
            i = _match_candidate(parsed, by_title, candidates) if parsed else None
        if i is None:
            n_unparsed += 1
        elif ratings[i] is None:
            ratings[i] = max(-float(scale), min(float(scale), parsed[2]))
    n_rated = sum(r is not None for r in ratings)
    return JudgeRatings([r if r is not None else 0.0 for r in ratings], n_rated, len(candidates) - n_rated, n_unparsed)


def _match_candidate(parsed, by_title: dict, candidates: Sequence[tuple[str, int]]) -> int | None:
    title, year, _ = parsed
    same_title = by_title.get(normalize_title(title), [])
    if year is not None:
        near = [(abs(candidates[i][1] - year), i) for i in same_title if abs(candidates[i][1] - year) <= 2]
        if near:
            return min(near)[1]
    return same_title[0] if len(same_title) == 1 else None


def validate_judge_reply(reply: str) -> str | None:
    """A usable judge reply has at least one line with an item and a rating."""
    return None if any(parse_judge_line(line) for line in reply.splitlines()) else "no rated line"


# ============================================================================= item metadata (Remap)


_META_FIELD = re.compile(r"^\W*(keywords?|plots?)\W*?:\s*(.*)$", re.IGNORECASE)


def parse_metadata_reply(reply: str) -> tuple[str, str] | None:
    """The teacher's metadata reply -> (keywords, plot), or None if it has neither field.

    The plot runs from "Plots:" to the end of the reply (one paragraph asked; more is kept).

    >>> parse_metadata_reply("**Heat (1995)**\\n**Keywords:** heist, LA\\nPlots: A thief.\\nA cop.")
    ('heist, LA', 'A thief. A cop.')
    """
    keywords, plot, in_plot = None, None, False
    for line in reply.splitlines():
        m = _META_FIELD.match(line.strip())
        if m:
            in_plot = m.group(1).lower().startswith("plot")
            value = m.group(2).strip().strip("*").strip()
            if in_plot:
                plot = value
            else:
                keywords = value
        elif in_plot and line.strip():
            plot = f"{plot} {line.strip()}".strip()
    if keywords is None and plot is None:
        return None
    return keywords or "", plot or ""


def validate_metadata_reply(reply: str) -> str | None:
    """A usable metadata reply has a "Keywords:" or a "Plots:" line."""
    return None if parse_metadata_reply(reply) else "no 'Keywords:' or 'Plots:' line"
