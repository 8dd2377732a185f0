"""The one parse: completion text -> ranked items with character spans.

Rewards, metrics and token segmentation all read the list this module returns, so the
reward of rank k and the tokens of rank k can never refer to different lines (the
authors' segmentation and reward parser can disagree: ``_segment_items_from_tokens`` vs ``process_rec_raw``).

Rule: split the completion on "\\n"; **line k is rank k, whatever it holds** (a blank
line, a line without a year, a trailing empty line after a final "\\n"). Ranks are
0-based here, like the token rank ids of ``rankgrpo.segment``. Each line is cleaned the
way the authors' parser (``process_rec_raw``) cleans it:

1. whitespace runs collapsed, stripped;
2. markdown/numbering decorations stripped repeatedly (``*``, ``_``, ``-``, ``#``,
   ``1.`` / ``1)`` prefixes);
3. surrounding quotes stripped;
4. ``<title> (<YYYY>)`` matched at the start of the line (title = shortest match);
5. parenthesised groups removed from the title until nothing changes.

A line that matches gets ``title`` and ``year``; ``valid`` is True when the year is also
plausible (1870..2100). A line that does not match keeps its rank with ``year=None`` and
``valid=False``; it scores 0.

Worked example::

    >>> items = parse_recommendations('1. **Heat (1995)**\\n\\nAlien\\nThe Wall (201)')
    >>> [(it.rank, it.title, it.year, it.valid) for it in items]
    [(0, 'Heat', 1995, True), (1, '', None, False), (2, 'Alien', None, False), (3, 'The Wall (201)', None, False)]
    >>> items[0].start, items[0].end, items[0].exact
    (0, 18, False)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from rankgrpo.catalog import is_plausible_year

_WS = re.compile(r"\s+")
_PARENS = re.compile(r"\([^()]*\)")
_ITEM = re.compile(r"(.+?)\s+\((\d{4})\)")
_LEAD_MARKS = re.compile(r"^([\*\_\-\#]+)")
_TRAIL_MARKS = re.compile(r"([\*\_\-\#]+)$")
_LEAD_BULLET = re.compile(r"^(?:[\*\_\-\#]+\s+|(?:\d+\s*[\.\)、\-\—\–]\s+))")
_LEAD_HASH = re.compile(r"^#+\s*")


@dataclass(frozen=True)
class Item:
    """One line of a completion.

    rank:  0-based line index (line k of the completion is rank k).
    title: cleaned title ('' for a blank line; the cleaned line text when no year parsed).
    year:  int year, or None when the line has no "(YYYY)".
    start, end: character span of the line in the completion (``text[start:end]``, no "\\n").
    valid: the line parsed to a title and a plausible year.
    exact: the line is exactly "Title (YYYY)" with no decoration (the Eq. 1 format).
    """

    rank: int
    title: str
    year: int | None
    start: int
    end: int
    valid: bool
    exact: bool = False

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.title, self.year)


def _collapse_space(text: str) -> str:
    return _WS.sub(" ", text.strip()).strip()


def _strip_format(text: str) -> str:
    """Repeatedly strip markdown marks at both ends and bullet/numbering prefixes."""
    text = text.strip()
    while True:
        new = _LEAD_MARKS.sub("", text).strip()
        new = _TRAIL_MARKS.sub("", new).strip()
        new = _LEAD_BULLET.sub("", new).strip()
        new = _LEAD_HASH.sub("", new)
        if new == text:
            return text
        text = new


def _strip_quotes(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _clean(text: str) -> str:
    return _strip_quotes(_strip_format(_collapse_space(text)))


def parse_line(line: str) -> tuple[str, int | None]:
    """Clean one line and split it into ``(title, year)``; ``year`` is None if no "(YYYY)".

    >>> parse_line('- "The Thing (1982)"')
    ('The Thing', 1982)
    >>> parse_line('Blade Runner 2049 (Director\\'s Cut) (2017)')
    ('Blade Runner 2049', 2017)
    """
    cleaned = _clean(line)
    m = _ITEM.match(cleaned)
    if not m:
        return cleaned, None
    title = m.group(1)
    while True:
        new = _clean(_PARENS.sub("", title.strip()))
        if new == title:
            break
        title = new
    return title, int(m.group(2))


def parse_recommendations(text: str) -> list[Item]:
    """Parse a completion into one ``Item`` per line (see the module docstring)."""
    items: list[Item] = []
    start = 0
    for rank, line in enumerate(text.split("\n")):
        end = start + len(line)
        title, year = parse_line(line)
        valid = year is not None and bool(title) and is_plausible_year(year)
        if year is not None and not valid:  # keep the line's text for diagnostics
            title = _clean(line)
            year = None
        exact = valid and line == f"{title} ({year})"
        items.append(Item(rank, title, year, start, end, valid, exact))
        start = end + 1
    return items


def format_recommendations(items: Iterable[Item | Sequence]) -> str:
    """Write a list in the paper's format (Eq. 1): "Title (YYYY)" lines, single "\\n", no trailing newline.

    >>> format_recommendations([("Heat", 1995), ("Alien", 1979)])
    'Heat (1995)\\nAlien (1979)'
    """
    lines = []
    for it in items:
        title, year = (it.title, it.year) if isinstance(it, Item) else (it[0], it[1])
        lines.append(f"{title} ({year})")
    return "\n".join(lines)
