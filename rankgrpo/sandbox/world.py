"""The sandbox world: an invented catalog, users with a latent taste, their conversations,
ground truths drawn from that taste, and time-ordered splits.

The generative story of one conversation:

1. a user has a latent taste ``Taste``: one or two genres, maybe an era, a director, keywords;
2. every film f gets a latent relevance ``s(u, f)`` (``World.relevance``): a weighted sum of
   genre overlap, closeness to the era, the director, shared keywords, popularity and recency;
   films released after the conversation are impossible;
3. the user mentions 0..max_seen films drawn from the taste (they become ``seen_titles``) and
   writes a message that puts parts of the taste into words ("80s", "creepy", a director);
4. each responder's ground truth is 1..max_groundtruth films drawn without replacement from
   ``softmax(s / temperature)``, never a seen title.

The oracle knows s and ranks by it; it is the best possible list in expectation, yet the
sampling in step 4 keeps its recall well below 1.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rankgrpo.catalog import Catalog, CatalogItem, normalize_title
from rankgrpo.data import CONVERSATION_MARKER, build_prompt
from rankgrpo.sandbox import vocab as V
from rankgrpo.sandbox.config import SandboxConfig

FORMAT = "rankgrpo-sandbox/1"
HIDDEN = "hidden"  # what only the simulator and the oracle may read
MIN_FILM_YEAR, MAX_FILM_YEAR = 1940, 2024
DECADE_WEIGHTS = {1940: 0.025, 1950: 0.035, 1960: 0.045, 1970: 0.06, 1980: 0.10, 1990: 0.14, 2000: 0.20,
                  2010: 0.27, 2020: 0.095}
_WS = re.compile(r"\s+")


def conversation_key(conversation: str) -> str:
    """Stable key of a conversation text (whitespace-insensitive), used to find its latent taste."""
    return hashlib.sha1(_WS.sub(" ", conversation).strip().encode("utf-8")).hexdigest()[:20]


def conversation_of(prompt: str) -> str:
    """The dialogue inside a recommendation prompt (the text after 'Here is the conversation: ')."""
    i = prompt.find(CONVERSATION_MARKER)
    return prompt[i + len(CONVERSATION_MARKER):] if i >= 0 else prompt


def rng_for(*parts) -> np.random.Generator:
    """A generator seeded by a hash of ``parts``: the same request always gets the same draws."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def sample_without_replacement(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices drawn one after another from softmax(logits), never the same twice (each draw
    renormalises over the films not drawn yet). Entries at -inf are never drawn; fewer than k
    come back if fewer are possible.

    A repeated draw is simply redrawn, which is exactly the renormalised distribution."""
    p = np.exp(logits - np.max(logits)) if np.isfinite(np.max(logits)) else np.zeros(len(logits))
    k = min(k, int(np.count_nonzero(p)))
    cdf = np.cumsum(p)
    chosen: list[int] = []
    tries = 0
    while len(chosen) < k:
        i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(p) - 1)
        if p[i] > 0 and i not in chosen:
            chosen.append(i)
        tries += 1
        if tries > 50 * k:  # a few films hold almost all the mass: take them out and renormalise
            p = p.copy()
            p[chosen] = 0.0
            cdf = np.cumsum(p)
            k = len(chosen) + min(k - len(chosen), int(np.count_nonzero(p)))
            tries = 0
    return np.array(chosen, dtype=np.int64)


# ----------------------------------------------------------------------------- taste


@dataclass
class Taste:
    """The latent taste behind one conversation.

    genres:   one or two genre names, the first one weighs more.
    era:      centre year of the preferred era, or None.
    director: favourite director, or None.
    keywords: favourite plot keywords (may be empty).
    date:     simulated time of the conversation (fractional year).
    seen:     catalog indices of the films mentioned in the conversation.
    """

    genres: tuple[str, ...] = ()
    era: int | None = None
    director: str | None = None
    keywords: tuple[str, ...] = ()
    date: float = 2025.0
    seen: tuple[int, ...] = ()

    def to_json(self, catalog: Catalog) -> dict:
        row = asdict(self)
        row["genres"], row["keywords"] = list(self.genres), list(self.keywords)
        row["seen"] = [[catalog[i].title, catalog[i].year] for i in self.seen]
        return row

    @classmethod
    def from_json(cls, row: dict, catalog: Catalog) -> "Taste":
        seen = tuple(i for i in (catalog.lookup(t, y, 0) for t, y in row.get("seen", [])) if i is not None)
        return cls(tuple(row.get("genres", ())), row.get("era"), row.get("director"),
                   tuple(row.get("keywords", ())), float(row.get("date", 2025.0)), seen)


def date_string(t: float) -> str:
    """Fractional year -> 'YYYY-MM-DD' (months of equal length; only the order matters)."""
    year = int(math.floor(t))
    day_of_year = min(int((t - year) * 360), 359)
    return f"{year:04d}-{day_of_year // 30 + 1:02d}-{day_of_year % 30 + 1:02d}"


# ----------------------------------------------------------------------------- the world


class World:
    """The catalog with its feature matrices, the latent tastes and the relevance model.

    Catalog index i is the row of every array: ``years[i]``, ``genre_matrix[i]`` (0/1 over
    ``vocab.GENRE_NAMES``), ``keyword_matrix[i]`` (0/1 over ``vocab.KEYWORDS``),
    ``director_ids[i]`` (index into ``directors``), ``popularity[i]`` and ``log_pop_z[i]``
    (standardised log popularity).
    """

    def __init__(self, config: SandboxConfig, catalog: Catalog, tastes: dict[str, Taste] | None = None,
                 root: Path | None = None):
        self.config = config
        self.catalog = catalog
        self.tastes: dict[str, Taste] = tastes or {}
        self.root = root
        n = len(catalog)
        genre_index = {g: j for j, g in enumerate(V.GENRE_NAMES)}
        keyword_index = {k: j for j, k in enumerate(V.KEYWORDS)}
        self.years = np.array([it.year for it in catalog], dtype=np.int64)
        self.genre_matrix = np.zeros((n, len(V.GENRE_NAMES)))
        self.keyword_matrix = np.zeros((n, len(V.KEYWORDS)))
        self.directors: list[str] = sorted({it.meta.get("director", "") for it in catalog})
        director_index = {d: j for j, d in enumerate(self.directors)}
        self.director_ids = np.zeros(n, dtype=np.int64)
        self.popularity = np.zeros(n, dtype=np.float64)
        for i, it in enumerate(catalog):
            for g in it.meta.get("genres", ()):
                if g in genre_index:
                    self.genre_matrix[i, genre_index[g]] = 1.0
            for k in it.meta.get("keywords", ()):
                if k in keyword_index:
                    self.keyword_matrix[i, keyword_index[k]] = 1.0
            self.director_ids[i] = director_index[it.meta.get("director", "")]
            self.popularity[i] = float(it.meta.get("popularity", 1))
        log_pop = np.log(np.maximum(self.popularity, 1.0))
        self.log_pop_z = (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9)
        self._genre_index, self._keyword_index, self._director_index = genre_index, keyword_index, director_index
        self._norm_titles = [normalize_title(it.title) for it in catalog]
        title_ids: dict[str, int] = {}
        self._title_ids = np.array([title_ids.setdefault(t, len(title_ids)) for t in self._norm_titles])
        self._title_id_of = title_ids
        self._genre_members = [np.flatnonzero(self.genre_matrix[:, j] > 0) for j in range(len(V.GENRE_NAMES))]
        self._genre_pop_cdf = [np.cumsum(self.popularity[m]) for m in self._genre_members]

    # -- relevance

    def relevance(self, taste: Taste, *, timeless: bool = False) -> np.ndarray:
        """Latent relevance s(u, f) of every film for ``taste``: float64 [n_films].

        s = genre_weight * (genre overlap, first genre 1, second 0.6)
          + era_weight * exp(-(year - era)^2 / (2 era_width^2))
          + director_weight * [director matches] + keyword_weight * (# shared keywords)
          + popularity_weight * log_pop_z + recency_weight * exp(-(date - year) / 3)
        and -inf for films released after the conversation. ``timeless=True`` drops the two
        terms that depend on the date (what a teacher that ignores the date believes).
        """
        c = self.config
        s = c.popularity_weight * self.log_pop_z.copy()
        weights = np.zeros(len(V.GENRE_NAMES))
        for j, g in enumerate(taste.genres):
            if g in self._genre_index:
                weights[self._genre_index[g]] = 1.0 if j == 0 else 0.6
        s += c.genre_weight * (self.genre_matrix @ weights)
        if taste.era is not None:
            s += c.era_weight * np.exp(-0.5 * ((self.years - taste.era) / c.era_width) ** 2)
        if taste.director in self._director_index:
            s += c.director_weight * (self.director_ids == self._director_index[taste.director])
        cols = [self._keyword_index[k] for k in taste.keywords if k in self._keyword_index]
        if cols:
            s += c.keyword_weight * self.keyword_matrix[:, cols].sum(axis=1)
        if not timeless:
            age = taste.date - self.years
            s += c.recency_weight * np.exp(-np.clip(age, 0, None) / 3.0)
            s[self.years > math.floor(taste.date)] = -np.inf
        return s

    def same_title_mask(self, indices) -> np.ndarray:
        """Boolean [n_films]: films whose normalised title equals that of any film in ``indices``
        (a remake shares its title, so it counts as seen too)."""
        hit = np.zeros(len(self._title_id_of), dtype=bool)
        hit[self._title_ids[list(indices)]] = True
        return hit[self._title_ids]

    def seen_mask_from_titles(self, seen_titles) -> np.ndarray:
        """Boolean [n_films]: films whose normalised title is one of ``seen_titles``."""
        ids = [self._title_id_of[t] for t in {normalize_title(x) for x in seen_titles} if t in self._title_id_of]
        return np.isin(self._title_ids, ids) if ids else np.zeros(len(self._title_ids), dtype=bool)

    def taste_of(self, conversation: str) -> Taste | None:
        """The latent taste of a conversation of this world, or None for an unknown one."""
        return self.tastes.get(conversation_key(conversation))

    # -- files

    @property
    def catalog_path(self) -> Path:
        return self._require_root() / "catalog.jsonl"

    def split_path(self, split: str) -> Path:
        return self._require_root() / f"{split}.jsonl"

    @property
    def base_model_path(self) -> Path:
        return self._require_root() / "base_model"

    def examples(self, split: str):
        from rankgrpo.data import load_examples
        return load_examples(self.split_path(split))

    def _require_root(self) -> Path:
        if self.root is None:
            raise ValueError("this world was not loaded from a directory")
        return self.root


# ----------------------------------------------------------------------------- catalog generation


@functools.lru_cache(maxsize=None)
def _genre_weights_cached(year: int) -> tuple[float, ...]:
    w = np.array([g.weight for g in V.GENRES])
    for j, g in enumerate(V.GENRES):
        for lo, hi, mult in g.eras:
            if lo <= year <= hi:
                w[j] *= mult
    return tuple(w / w.sum())


def _genre_weights(year: int) -> np.ndarray:
    """Genre frequencies among films of ``year``."""
    return np.array(_genre_weights_cached(year))


def _sample_year(rng: np.random.Generator) -> int:
    decades = list(DECADE_WEIGHTS)
    p = np.array(list(DECADE_WEIGHTS.values()))
    d = decades[rng.choice(len(decades), p=p / p.sum())]
    return int(rng.integers(d, min(d + 9, MAX_FILM_YEAR) + 1))


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _make_directors(rng: np.random.Generator, n: int) -> list[dict]:
    names, out = set(), []
    while len(out) < n:
        name = f"{_pick(rng, V.FIRST_NAMES)} {_pick(rng, V.LAST_NAMES)}"
        if name in names:
            continue
        names.add(name)
        start = int(rng.integers(1932, 2019))
        k = 1 + int(rng.random() < 0.5)
        genres = [V.GENRE_NAMES[j] for j in rng.choice(len(V.GENRES), size=k, replace=False,
                                                           p=_genre_weights(start + 5))]
        out.append({"name": name, "start": start, "end": min(start + int(rng.integers(8, 41)), MAX_FILM_YEAR),
                    "genres": genres, "fame": float(rng.normal(0, 0.5))})
    return out


def _title_words(rng: np.random.Generator, genres: list[str]) -> tuple[str, str, str]:
    """(noun, second noun, adjective): genre words about half of the time."""
    gs = [g for g in V.GENRES if g.name in genres]

    def noun():
        return _pick(rng, _pick(rng, gs).nouns) if rng.random() < 0.55 else _pick(rng, V.GENERIC_NOUNS)

    adj = _pick(rng, _pick(rng, gs).adjectives) if rng.random() < 0.5 else _pick(rng, V.GENERIC_ADJECTIVES)
    n1 = noun()
    n2 = noun()
    while n2 == n1:
        n2 = _pick(rng, V.GENERIC_NOUNS)
    return n1, n2, adj


_TITLE_TEMPLATES = (
    ("The {A} {N}", 14), ("{A} {N}", 10), ("The {N}", 6), ("{N} of the {N2}", 8), ("{N} in {P}", 5),
    ("The {N} of {P}", 4), ("{F}'s {N}", 5), ("{N} & {N2}", 4), ("{F} & {F2}", 2), ("{N}", 3), ("{P}", 1),
    ("{Num} {Plural}", 3), ("Don't {V}", 2), ("{N}: {S}", 6), ("The {A} {N}: {S}", 2), ("A {N} for {F}", 2),
    ("{F} {L}", 2), ("The {L} {N}", 3), ("{A} {N} in {P}", 2), ("Mr. {L}", 1), ("{N} at {P}", 2),
)
_PLURALS = ("Days", "Nights", "Years", "Brothers", "Seconds", "Steps", "Letters", "Graves", "Miles", "Summers")


def _make_title(rng: np.random.Generator, genres: list[str]) -> str:
    templates, weights = zip(*_TITLE_TEMPLATES)
    p = np.array(weights, dtype=float)
    template = templates[rng.choice(len(templates), p=p / p.sum())]
    n1, n2, adj = _title_words(rng, genres)
    f1 = _pick(rng, V.FIRST_NAMES)
    f2 = _pick(rng, [f for f in V.FIRST_NAMES if f != f1])
    title = template.format(A=adj, N=n1, N2=n2, P=_pick(rng, V.PLACES), F=f1, F2=f2, L=_pick(rng, V.LAST_NAMES),
                           Num=_pick(rng, V.NUMBER_WORDS), Plural=_pick(rng, _PLURALS), V=_pick(rng, V.VERBS),
                           S=_pick(rng, V.SUBTITLES))
    return re.sub(r"^A (?=[AEIOU])", "An ", title)


def make_plot(rng: np.random.Generator, genres, keywords, year: int) -> str:
    """A one-paragraph plot that carries the film's keywords and genre flavour."""
    kws = list(keywords) or ["a secret"]
    hero = _pick(rng, V.PROTAGONISTS)
    setting = _pick(rng, V.SETTINGS)
    first = f"{hero[0].upper()}{hero[1:]} in {setting} is drawn into a story of {kws[0]}"
    first += f" and {kws[1]}." if len(kws) > 1 else "."
    parts = [first]
    gs = [g for g in V.GENRES if g.name in genres]
    if gs:
        parts.append(_pick(rng, gs[0].blurb))
    if len(kws) > 2:
        rest = kws[2:]
        parts.append(f"Along the way, {', '.join(rest)} {'changes' if len(rest) == 1 else 'change'} everything.")
    decade = year // 10 * 10
    parts.append(f"Set in the {decade}s." if rng.random() < 0.4 else "")
    return " ".join(p for p in parts if p)


def _film_keywords(rng: np.random.Generator, genres: list[str]) -> list[str]:
    pool = list(dict.fromkeys(k for g in V.GENRES if g.name in genres for k in g.keywords))
    n = int(rng.integers(3, 7))
    chosen = [pool[j] for j in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    if rng.random() < 0.3:
        extra = _pick(rng, V.KEYWORDS)
        if extra not in chosen:
            chosen.append(extra)
    return chosen


def _choose_director(rng: np.random.Generator, directors: list[dict], year: int, genres: list[str]) -> dict:
    active = [d for d in directors if d["start"] <= year <= d["end"]]
    matching = [d for d in active if set(d["genres"]) & set(genres)]
    pool = matching or active or directors
    return _pick(rng, pool)


def _popularity(rng: np.random.Generator, year: int, director: dict) -> int:
    """A long-tailed count of ratings (log-normal), a little higher for recent films and famous directors."""
    z = rng.normal(0.0, 1.0) + 0.35 * (year >= 1990) + director["fame"]
    return max(5, int(round(600 * math.exp(1.4 * z))))


_ROMAN = {2: "II", 3: "III", 4: "IV", 5: "V"}
_PART = {2: "Part Two", 3: "Part Three", 4: "Part Four", 5: "Part Five"}


def _sequel_title(base: str, number: int, style: str, subtitle: str) -> str:
    if style == "arabic":
        return f"{base} {number}"
    if style == "roman":
        return f"{base} {_ROMAN[number]}"
    if style == "part":
        return f"{base}: {_PART[number]}"
    return f"{base}: {subtitle}"


def generate_catalog(cfg: SandboxConfig) -> list[dict]:
    """The catalog as a list of film dicts {title, year, genres, keywords, director, popularity, plot},
    sorted by (title, year). Titles are unique except for remakes (same title, years apart)."""
    rng = np.random.default_rng([cfg.seed, 1])
    directors = _make_directors(rng, max(20, cfg.n_films // 12))
    n_sequels = int(round(cfg.sequel_rate * cfg.n_films))
    n_remakes = int(round(cfg.remake_rate * cfg.n_films))
    n_base = cfg.n_films - n_sequels - n_remakes
    films: list[dict] = []
    titles: set[str] = set()

    def add(title, year, genres, keywords, director, popularity):
        films.append({"title": title, "year": int(year), "genres": list(genres), "keywords": list(keywords),
                      "director": director["name"], "popularity": int(popularity),
                      "plot": make_plot(rng, genres, keywords, year)})
        titles.add(normalize_title(title))

    while len(films) < n_base:
        year = _sample_year(rng)
        wg = _genre_weights(year)
        n_genres = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
        genres = [V.GENRE_NAMES[j] for j in rng.choice(len(V.GENRES), size=n_genres, replace=False, p=wg)]
        title = _make_title(rng, genres)
        if normalize_title(title) in titles:
            continue
        director = _choose_director(rng, directors, year, genres)
        add(title, year, genres, _film_keywords(rng, genres), director, _popularity(rng, year, director))

    by_name = {d["name"]: d for d in directors}
    # Sequels: popular films before 2020 get follow-ups in the same genres.
    franchises: dict[int, dict] = {}
    originals = [i for i, f in enumerate(films) if f["year"] <= 2019]
    pop = np.array([films[i]["popularity"] for i in originals], dtype=float)
    attempts = 0
    while len(films) < n_base + n_sequels and attempts < 50 * max(1, n_sequels):
        attempts += 1
        i = originals[rng.choice(len(originals), p=pop / pop.sum())]
        fr = franchises.setdefault(i, {"number": 1, "year": films[i]["year"],
                                       "style": _pick(rng, ("arabic", "roman", "part", "subtitle"))})
        if fr["number"] >= 5:
            continue
        orig = films[i]
        year = fr["year"] + int(rng.integers(2, 6))
        if year > MAX_FILM_YEAR:
            continue
        title = _sequel_title(orig["title"], fr["number"] + 1, fr["style"], _pick(rng, V.SUBTITLES))
        if normalize_title(title) in titles:
            continue
        fr["number"] += 1
        fr["year"] = year
        director = by_name[orig["director"]] if rng.random() < 0.6 else \
            _choose_director(rng, directors, year, orig["genres"])
        keywords = list(orig["keywords"])
        keywords[int(rng.integers(len(keywords)))] = _pick(rng, _film_keywords(rng, orig["genres"]))
        keywords = list(dict.fromkeys(keywords))
        add(title, year, orig["genres"], keywords, director, orig["popularity"] * rng.uniform(0.3, 0.9))

    # Remakes: same title, a later year (more than the 2-year tolerance apart), a new director.
    remade = set()
    olds = [i for i, f in enumerate(films[:n_base]) if f["year"] <= 2005]
    attempts = 0
    while len(films) < cfg.n_films and attempts < 50 * max(1, n_remakes):
        attempts += 1
        i = _pick(rng, olds)
        if i in remade:
            continue
        orig = films[i]
        year = orig["year"] + int(rng.integers(12, 41))
        if year > MAX_FILM_YEAR:
            continue
        remade.add(i)
        director = _choose_director(rng, directors, year, orig["genres"])
        add(orig["title"], year, orig["genres"], _film_keywords(rng, orig["genres"]), director,
            _popularity(rng, year, director))
    # Top up with base films if sequels or remakes ran short (tiny catalogs).
    while len(films) < cfg.n_films:
        year = _sample_year(rng)
        genres = [V.GENRE_NAMES[int(rng.choice(len(V.GENRES), p=_genre_weights(year)))]]
        title = _make_title(rng, genres)
        if normalize_title(title) in titles:
            continue
        director = _choose_director(rng, directors, year, genres)
        add(title, year, genres, _film_keywords(rng, genres), director, _popularity(rng, year, director))
    films.sort(key=lambda f: (f["title"], f["year"]))
    return films


def catalog_from_films(films: list[dict]) -> Catalog:
    return Catalog(CatalogItem(f["title"], f["year"], {k: v for k, v in f.items() if k not in ("title", "year")})
                   for f in films)


# ----------------------------------------------------------------------------- users and conversations


def sample_taste(rng: np.random.Generator, world: World, date: float) -> Taste:
    c = world.config
    year = min(int(math.floor(date)), MAX_FILM_YEAR)
    wg = _genre_weights(year - 15)
    n_genres = 2 if rng.random() < c.second_genre_rate else 1
    genres = tuple(V.GENRE_NAMES[j] for j in rng.choice(len(V.GENRES), size=n_genres, replace=False, p=wg))
    in_genre = world._genre_members[V.GENRE_NAMES.index(genres[0])]
    era = None
    if rng.random() < c.era_rate and len(in_genre):
        era = int(world.years[_pick(rng, in_genre)])
    director = None
    if rng.random() < c.director_rate and len(in_genre):
        # the director of a film in the genre, drawn in proportion to the film's popularity
        cdf = world._genre_pop_cdf[V.GENRE_NAMES.index(genres[0])]
        film = in_genre[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)]
        director = world.directors[int(world.director_ids[film])]
    keywords: tuple[str, ...] = ()
    if rng.random() < c.keyword_rate:
        pool = list(dict.fromkeys(k for g in V.GENRES if g.name in genres for k in g.keywords))
        n = 2 if rng.random() < 0.3 else 1
        keywords = tuple(pool[j] for j in rng.choice(len(pool), size=n, replace=False))
    return Taste(genres, era, director, keywords, date)


def era_phrase(rng: np.random.Generator, era: int, date: float) -> str:
    decade = era // 10 * 10
    if era >= date - 4:
        return _pick(rng, ("last few years", "recent years"))
    short = f"{decade % 100:02d}s"
    options = [short, f"{decade}s"]
    if decade < 1960:
        options.append("golden age of Hollywood")
    return _pick(rng, options)


def _mention(rng: np.random.Generator, world: World, i: int) -> str:
    """How a user writes a film's name: bare (most often), with "(YYYY)" or with a bare year."""
    it = world.catalog[i]
    u = rng.random()
    if u < 0.7:
        return it.title
    return f"{it.title} ({it.year})" if u < 0.9 else f"{it.title} {it.year}"


def render_conversation(rng: np.random.Generator, world: World, taste: Taste, seen: list[int],
                        suggested: int | None) -> str:
    """The dialogue text: "USER: <post title>. <body>\\n" [+ "SYSTEM: ...\\nUSER: ...\\n"].

    Each part of the taste is put into words with probability ``reveal_rate``; the mentioned
    films ``seen`` share the taste. ``suggested`` is a film the SYSTEM turn proposes."""
    c = world.config
    reveal = {part: rng.random() < c.reveal_rate for part in ("genres", "era", "director", "keywords")}
    genre_objs = [g for g in V.GENRES if g.name in taste.genres]
    g_phrase = " and ".join(_pick(rng, g.synonyms) for g in genre_objs)
    era_text = era_phrase(rng, taste.era, taste.date) if taste.era is not None else ""
    era_from = f" from the {era_text}" if (reveal["era"] and era_text) else ""
    names = [_mention(rng, world, i) for i in seen]

    if names and (not reveal["genres"] or rng.random() < 0.35):
        title = _pick(rng, V.POST_TITLES_SEEN).format(a=names[0])
    elif reveal["genres"]:
        title = _pick(rng, V.POST_TITLES_GENRE)
        title = title.format(g=g_phrase, G=g_phrase[0].upper() + g_phrase[1:], era_from=era_from)
        era_from = ""  # already said
    else:
        title = _pick(rng, V.POST_TITLES_VAGUE)

    body: list[str] = []
    if len(names) == 1:
        body.append(_pick(rng, V.BODY_SEEN_1).format(a=names[0]))
    elif len(names) == 2:
        body.append(_pick(rng, V.BODY_SEEN_2).format(a=names[0], b=names[1]))
    elif len(names) >= 3:
        body.append(_pick(rng, V.BODY_SEEN_3).format(a=names[0], b=names[1], c=names[2]))
    if reveal["genres"] and rng.random() < 0.5:
        body.append(_pick(rng, V.BODY_MOOD).format(m=_pick(rng, _pick(rng, genre_objs).moods)))
    if reveal["director"] and taste.director:
        body.append(_pick(rng, V.BODY_DIRECTOR).format(d=taste.director))
    if reveal["keywords"] and taste.keywords:
        if len(taste.keywords) > 1:
            body.append(_pick(rng, V.BODY_KEYWORD_2).format(k=taste.keywords[0], k2=taste.keywords[1]))
        else:
            body.append(_pick(rng, V.BODY_KEYWORD_1).format(k=taste.keywords[0]))
    if era_from:
        body.append(_pick(rng, V.BODY_ERA).format(e=era_text))
    if rng.random() < 0.2:
        others = [g for g in V.GENRES if g.name not in taste.genres]
        body.append(_pick(rng, V.BODY_DISLIKE).format(x=_pick(rng, _pick(rng, others).synonyms)))
    rng.shuffle(body)
    filler = _pick(rng, V.BODY_FILLER)
    if filler:
        body.append(filler)
    text = f"USER: {title}. {' '.join(body)}".rstrip() + "\n"

    if suggested is not None:
        g = _pick(rng, genre_objs)
        kws = world.catalog[suggested].meta.get("keywords") or ["surprises"]
        reason = _pick(rng, V.SYSTEM_REASONS).format(k=_pick(rng, kws), g=_pick(rng, g.synonyms),
                                                      m=_pick(rng, g.moods))
        system = (_pick(rng, V.SYSTEM_OPENERS).format(a=_mention(rng, world, suggested)) + " " + reason).strip()
        text += f"SYSTEM: {system}\nUSER: {_pick(rng, V.USER_REPLIES)} {_pick(rng, V.USER_FOLLOWUPS)}\n"
    return text


_GT_SIZE_WEIGHTS = np.array([0.22, 0.2, 0.16, 0.13, 0.1, 0.08, 0.06, 0.05])


def _gt_size_cdf(max_gt: int) -> np.ndarray:
    w = np.resize(_GT_SIZE_WEIGHTS, max_gt) if max_gt > len(_GT_SIZE_WEIGHTS) else _GT_SIZE_WEIGHTS[:max_gt]
    return np.cumsum(w / w.sum())


def _gt_size(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """1..max_groundtruth, small sizes likelier."""
    return 1 + min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


@dataclass
class Conversation:
    """One generated conversation and the samples (one per responder) it yields."""

    index: int
    split: str
    date: float
    text: str
    taste: Taste
    groundtruths: list[list[int]] = field(default_factory=list)


def generate_conversations(world: World, sizes: dict[str, int]) -> list[Conversation]:
    """Conversations in time order, split by split: the samples of split ``name`` add up to
    exactly ``sizes[name]`` (the splits follow each other in time in the order given).
    A conversation never straddles two splits."""
    c = world.config
    rng = np.random.default_rng([c.seed, 2])
    responders: list[tuple[str, int]] = []
    for split, size in sizes.items():
        total = 0
        while total < size:
            responders.append((split, min(2 if rng.random() < c.multi_response_rate else 1, size - total)))
            total += responders[-1][1]
    dates = np.sort(rng.uniform(c.start_year, c.end_year, size=len(responders)))
    out, keys = [], set()
    gt_cdf = _gt_size_cdf(c.max_groundtruth)
    for index, (date, (split, n_resp)) in enumerate(zip(dates, responders)):
        while True:  # conversation texts are unique: a draw that repeats an earlier text is redrawn
            taste, s, text = _draw_conversation(rng, world, float(date))
            key = conversation_key(text)
            if key not in keys:
                keys.add(key)
                break
        logits = np.where(world.same_title_mask(taste.seen), -np.inf, s / c.temperature)
        conv = Conversation(index, split, float(date), text, taste)
        for _ in range(n_resp):
            conv.groundtruths.append([int(i) for i in sample_without_replacement(logits, _gt_size(rng, gt_cdf), rng)])
        out.append(conv)
    return out


def _draw_conversation(rng: np.random.Generator, world: World, date: float) -> tuple[Taste, np.ndarray, str]:
    """A taste (with the films the user mentions), its relevance vector and the conversation text."""
    c = world.config
    taste = sample_taste(rng, world, date)
    s = world.relevance(taste)
    # mentioned films lean popular: people talk about what they have seen
    n_seen = int(rng.integers(0, c.max_seen + 1))
    seen = [int(i) for i in sample_without_replacement((s + 0.5 * world.log_pop_z) / c.temperature, n_seen, rng)]
    suggested = None
    if rng.random() < c.multi_turn_rate:
        blocked = world.same_title_mask(seen)
        pick = sample_without_replacement(np.where(blocked, -np.inf, s + world.log_pop_z), 1, rng)
        suggested = int(pick[0]) if len(pick) else None
    taste.seen = tuple(seen + ([suggested] if suggested is not None else []))
    return taste, s, render_conversation(rng, world, taste, seen, suggested)


def sample_rows(world: World, conv: Conversation) -> list[dict]:
    """The JSONL records of one conversation, in the released data's format (years as strings)."""
    rows = []
    seen_titles = list(dict.fromkeys(world.catalog[i].title for i in conv.taste.seen))
    for r, gt in enumerate(conv.groundtruths):
        rows.append({
            "id": f"sbx-{conv.index:06d}-{r}",
            "prompt": [{"role": "user", "content": build_prompt(conv.text)}],
            "seen_titles": seen_titles,
            "groundtruth_with_release_year": [[world.catalog[i].title, str(world.catalog[i].year)] for i in gt],
            "num_groundtruth": len(gt),
            "date": date_string(conv.date),
        })
    return rows


def films_to_jsonl(films: list[dict]) -> str:
    keys = ("title", "year", "genres", "keywords", "director", "popularity", "plot")
    return "".join(json.dumps({k: f[k] for k in keys}, ensure_ascii=False) + "\n" for f in films)


def strip_accents(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
