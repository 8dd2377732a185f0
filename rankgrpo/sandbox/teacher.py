"""The simulated black-box teacher and LLM judge (§2.2, App. A.1-A.2).

``SandboxTeacher.chat(messages) -> str`` answers the three prompts Stage 1 sends:

* the recommendation prompt (``rankgrpo.data.build_prompt``) -> N lines "Title (Year)";
* the metadata prompt (``rankgrpo.demos.prompts.build_metadata_prompt``) ->
  "Title (Year)\\nKeywords: ...\\nPlots: ...", for any title, invented ones included;
* the judge prompt (``rankgrpo.demos.prompts.build_judge_prompt``) -> one line
  "title (year)####rating" per candidate, ratings in -2..2.

What the teacher believes about a conversation is its *belief*: the latent relevance of the
conversation's taste (it reads the world's hidden tastes; for a conversation it does not
know it infers a taste from the words) plus its biases:

    belief(f) = s_timeless(u, f) + popularity_bias * log_pop_z(f) + item_bias(f)
                + knowledge_noise * eps(u, f)

``item_bias`` is fixed per film (a systematic over/under-rating that Adjust can learn);
``eps`` is drawn per conversation. Its lists then suffer the paper's failure modes, each a
``TeacherConfig`` field: out-of-catalog names (invented titles, misspellings, wrong years),
format slips, and a ranking that drifts toward loosely related films in the tail.

Every answer is deterministic given the teacher's seed and the request text, so caching
and resuming a Stage 1 run is meaningful.
"""
from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from rankgrpo.catalog import normalize_title
from rankgrpo.parsing import parse_line
from rankgrpo.sandbox import vocab as V
from rankgrpo.sandbox.config import TeacherConfig
from rankgrpo.sandbox.world import (
    Taste,
    World,
    conversation_key,
    conversation_of,
    make_plot,
    rng_for,
    strip_accents,
)

OOC_KINDS = ("invented", "misspelled", "wrong_year")
_METADATA_RE = re.compile(r"Summarize the metadata for the movie (.+?) \((\d{1,4}|unknown year)\) based on")
_N_ITEMS_RE = re.compile(r"reply with (\d+) recommendations")
_JUDGE_CONV = "Here is the conversation: "
_JUDGE_CANDS = " Here are the movie candidates: "
_JUDGE_END = ". You need to reply with the rating"
_EXTRA_WORDS = (" - a classic", " (highly recommended)", ", a must-see", " - great pick", " – underrated gem")
_DECADE_RE = re.compile(r"\b(?:(19|20)(\d)0s|(\d)0s)\b")
_ARABIC_TO_ROMAN = {"2": "II", "3": "III", "4": "IV", "5": "V"}
_ROMAN_TO_ARABIC = {v: k for k, v in _ARABIC_TO_ROMAN.items()}


# ----------------------------------------------------------------------------- out-of-catalog names


def _typo(rng: np.random.Generator, title: str) -> str | None:
    words = title.split(" ")
    candidates = [j for j, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return None
    j = candidates[int(rng.integers(len(candidates)))]
    w = words[j]
    p = int(rng.integers(1, len(w) - 1))
    op = int(rng.integers(3))
    if op == 0:
        w = w[:p] + w[p + 1:]                      # drop a letter
    elif op == 1:
        w = w[:p] + w[p + 1] + w[p] + w[p + 2:]    # swap two neighbours
    else:
        w = w[:p] + w[p] + w[p:]                   # double a letter
    words[j] = w
    return " ".join(words)


def misspellings(rng: np.random.Generator, title: str) -> list[str]:
    """Names a careless writer gives an existing film (may normalise back to it; filtered later)."""
    out = [_typo(rng, title), _typo(rng, title)]
    if title.startswith("The "):
        out.append(title[4:])
    elif not title.startswith("A "):
        out.append("The " + title)
    if "&" in title:
        out.append(title.replace("&", "and"))
    elif " and " in title:
        out.append(title.replace(" and ", " & "))
    if strip_accents(title) != title:
        out.append(strip_accents(title))
    last = title.rsplit(" ", 1)
    if len(last) == 2 and last[1] in _ARABIC_TO_ROMAN:
        out.append(f"{last[0]} {_ARABIC_TO_ROMAN[last[1]]}")
    elif len(last) == 2 and last[1] in _ROMAN_TO_ARABIC:
        out.append(f"{last[0]} {_ROMAN_TO_ARABIC[last[1]]}")
    if ": " in title:
        out.append(title.replace(": ", " - ", 1))
    return [t for t in out if t]


def inventions(rng: np.random.Generator, title: str, genres) -> list[str]:
    """Hallucinated films inspired by an existing one: a made-up sequel, a swapped word, a new subtitle."""
    out = []
    base = title.split(": ")[0]
    out.append(f"{base}: {V.SUBTITLES[int(rng.integers(len(V.SUBTITLES)))]}")
    out.append(f"{base} 2" if not base[-1].isdigit() else f"Return to {base}")
    words = title.split(" ")
    content = [j for j, w in enumerate(words) if w[:1].isupper() and w not in ("The", "A", "of", "&")]
    if content:
        j = content[int(rng.integers(len(content)))]
        gs = [g for g in V.GENRES if g.name in genres] or list(V.GENRES)
        pool = gs[int(rng.integers(len(gs)))].nouns + V.GENERIC_NOUNS
        word = words[j].rstrip(":,.!?")
        new = pool[int(rng.integers(len(pool)))]
        if new != word:
            out.append(" ".join(words[:j] + [new + words[j][len(word):]] + words[j + 1:]))
    return out


def _trigrams(text: str) -> set[str]:
    t = f"  {normalize_title(text)} "
    return {t[i:i + 3] for i in range(len(t) - 2)}


# ----------------------------------------------------------------------------- the teacher


class SandboxTeacher:
    """A chat model that knows the sandbox world, imperfectly (see the module docstring).

    teacher = SandboxTeacher(world, ooc_rate=0.3)      # a World or its directory; any TeacherConfig field
    teacher.chat([{"role": "user", "content": build_prompt(conversation)}])  -> 20 lines
    """

    def __init__(self, world: World | str | Path, config: TeacherConfig | None = None, **overrides):
        if not isinstance(world, World):  # a world directory
            from rankgrpo.sandbox.build import load_world
            world = load_world(world)
        names = {f.name for f in fields(TeacherConfig)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown teacher parameter(s) {sorted(unknown)}; expected some of {sorted(names)}")
        self.config = replace(config or TeacherConfig(), **overrides)
        self.config.validate()
        self.world = world
        cat = world.catalog
        n = len(cat)
        self.item_bias = self.config.item_bias * rng_for("item-bias", self.config.seed).standard_normal(n)
        self._pop_quantile = np.argsort(np.argsort(world.popularity, kind="stable"), kind="stable") / max(1, n - 1)
        # Out-of-catalog variants of every film, and the way back from a variant to its film.
        self.variants: list[dict[str, list]] = []
        self._variant_source: dict[str, tuple[int, str]] = {}
        for i, it in enumerate(cat):
            rng = rng_for("variants", it.title, it.year)
            kinds = {
                "invented": [t for t in inventions(rng, it.title, it.meta.get("genres", ()))
                             if not cat.has_title(t)],
                "misspelled": [t for t in misspellings(rng, it.title) if not cat.has_title(t)],
                "wrong_year": [],
            }
            for delta in (int(rng.integers(3, 9)), -int(rng.integers(3, 9))):
                year = it.year + delta
                if 1900 <= year <= 2025 and cat.lookup(it.title, year, 2) is None:
                    kinds["wrong_year"].append(year)
            for kind in ("misspelled", "invented"):
                kinds[kind] = list(dict.fromkeys(kinds[kind]))
                for t in kinds[kind]:
                    self._variant_source.setdefault(normalize_title(t), (i, kind))
            self.variants.append(kinds)
        self._trigram_index: list[set[str]] | None = None
        self._title_regex: re.Pattern | None = None

    # -- chat

    def chat(self, messages: list[dict]) -> str:
        """Answer the last user message (a recommendation, metadata or judge prompt)."""
        users = [m["content"] for m in messages if m.get("role") == "user"]
        text = users[-1] if users else (messages[-1]["content"] if messages else "")
        m = _METADATA_RE.search(text)
        if m:
            year = int(m.group(2)) if m.group(2).isdigit() else None
            return self.describe(m.group(1), year)
        if _JUDGE_CANDS in text and _JUDGE_CONV in text:
            start = text.index(_JUDGE_CONV) + len(_JUDGE_CONV)
            mid = text.index(_JUDGE_CANDS, start)
            end = text.find(_JUDGE_END, mid)
            block = text[mid + len(_JUDGE_CANDS): end if end >= 0 else len(text)]
            candidates = [parse_line(line) for line in block.split("\n") if line.strip()]
            return self.judge(text[start:mid], candidates, request=text)
        m = _N_ITEMS_RE.search(text)
        return self.recommend(conversation_of(text), n=int(m.group(1)) if m else 20, request=text)

    # -- belief

    def taste_for(self, conversation: str) -> Taste:
        """The world's hidden taste of a known conversation; otherwise one inferred from the words."""
        return self.world.taste_of(conversation) or self.infer_taste(conversation)

    def belief(self, conversation: str) -> np.ndarray:
        """The teacher's relevance scores over the catalog for one conversation (seen films at -inf)."""
        taste = self.taste_for(conversation)
        c, w = self.config, self.world
        noise = rng_for("belief", c.seed, conversation_key(conversation)).standard_normal(len(w.catalog))
        b = w.relevance(taste, timeless=True) + c.popularity_bias * w.log_pop_z + self.item_bias \
            + c.knowledge_noise * noise
        b[w.same_title_mask(taste.seen)] = -np.inf
        return b

    def infer_taste(self, conversation: str) -> Taste:
        """Read a taste off the words of an unknown conversation: genre words, decades, directors,
        keywords and the catalog titles it mentions. Nothing recognised -> an empty taste
        (the teacher then answers with popular films)."""
        w = self.world
        low = conversation.lower()
        found = []
        for g in V.GENRES:
            pos = [m.start() for s in g.synonyms for m in re.finditer(rf"\b{re.escape(s)}\b", low)]
            if pos:
                found.append((min(pos), g.name))
        genres = tuple(name for _, name in sorted(found))[:2]
        era = None
        m = _DECADE_RE.search(low)
        if m:
            if m.group(3):
                d = int(m.group(3))
                era = (2000 + 10 * d if d <= 2 else 1900 + 10 * d) + 5
            else:
                era = int(m.group(1) + m.group(2) + "0") + 5
        elif re.search(r"\b(recent|last few years|new releases?)\b", low):
            era = 2021
        director = next((d for d in w.directors if d and d in conversation), None)
        keywords = tuple(k for k in V.KEYWORDS if re.search(rf"\b{re.escape(k)}\b", low))[:2]
        if self._title_regex is None:
            titles = sorted({it.title for it in w.catalog}, key=lambda t: (-len(t), t))
            self._title_regex = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in titles) + r")(?!\w)")
        seen = tuple(i for m in self._title_regex.finditer(conversation)
                     for i in w.catalog.indices_of_title(m.group(0)))
        return Taste(genres, era, director, keywords, 2025.0, seen)

    # -- (a) recommendations

    def recommend(self, conversation: str, n: int = 20, request: str = "") -> str:
        """N lines: the teacher's best films, drifting toward loosely related ones in the tail,
        with out-of-catalog names and format slips."""
        c, w = self.config, self.world
        b = self.belief(conversation)
        rng = rng_for("recommend", c.seed, request or conversation, n)
        order = np.argsort(-b, kind="stable")
        order = order[np.isfinite(b[order])]
        drift_pool = order[n: n + 300]
        drift_p = np.sqrt(w.popularity[drift_pool])
        chosen: list[int] = []
        nxt = 0
        for k in range(n):
            if len(drift_pool) and rng.random() < c.tail_noise * k / max(1, n - 1):
                i = int(drift_pool[rng.choice(len(drift_pool), p=drift_p / drift_p.sum())])
                if i not in chosen:
                    chosen.append(i)
                    continue
            while nxt < len(order) and int(order[nxt]) in chosen:
                nxt += 1
            if nxt < len(order):
                chosen.append(int(order[nxt]))
        lines = []
        for k, i in enumerate(chosen):
            title, year = w.catalog[i].title, w.catalog[i].year
            if rng.random() < c.ooc_rate * (0.5 + k / max(1, n - 1)):
                title, year = self._corrupt(i, rng)
            line = f"{title} ({year})"
            if rng.random() < c.format_slip_rate:
                line = self._slip(rng, title, year, k)
            lines.append(line)
        return "\n".join(lines)

    def _corrupt(self, i: int, rng: np.random.Generator) -> tuple[str, int]:
        it = self.world.catalog[i]
        mix = np.array(self.config.ooc_mix, dtype=float)
        first = OOC_KINDS[int(rng.choice(3, p=mix / mix.sum()))]
        for kind in (first,) + OOC_KINDS:  # fall back to another kind if a film has none of the first
            options = self.variants[i][kind]
            if options:
                pick = options[int(rng.integers(len(options)))]
                return (it.title, pick) if kind == "wrong_year" else (pick, it.year)
        return f"{it.title}: Origins", it.year  # unreachable in practice: every film has variants

    @staticmethod
    def _slip(rng: np.random.Generator, title: str, year: int, k: int) -> str:
        kind = int(rng.integers(6))
        if kind == 0:
            return f"{k + 1}. {title} ({year})"
        if kind == 1:
            return f"**{title} ({year})**"
        if kind == 2:
            return f'"{title}" ({year})'
        if kind == 3:
            return f"{title} ({year}){_EXTRA_WORDS[int(rng.integers(len(_EXTRA_WORDS)))]}"
        if kind == 4:
            return title
        return f"{title} [{year}]"

    # -- (b) metadata

    def resolve(self, title: str, year: int | None) -> tuple[int | None, str]:
        """(catalog index the name refers to, how): how is "exact" (in catalog, year within 2),
        "misspelled" / "invented" / "wrong_year" (a known out-of-catalog variant of that film),
        "similar" (the most similar catalog title, if close enough) or "unknown" (index None)."""
        cat = self.world.catalog
        if year is not None:
            i = cat.lookup(title, year, 2)
            if i is not None:
                return i, "exact"
        norm = normalize_title(title)
        if norm in self._variant_source:
            return self._variant_source[norm]
        same = cat.indices_of_title(title)
        if same:
            return min(same, key=lambda j: abs(cat[j].year - (year or cat[j].year))), "wrong_year"
        if self._trigram_index is None:
            self._trigram_index = [_trigrams(it.title) for it in cat]
        q = _trigrams(title)
        sims = [len(q & t) / len(q | t) for t in self._trigram_index]
        best = int(np.argmax(sims))
        return (best, "similar") if sims[best] >= 0.5 else (None, "unknown")

    def describe(self, title: str, year: int | None) -> str:
        """Metadata in the template of the metadata prompt, plausible for any name."""
        c, w = self.config, self.world
        rng = rng_for("metadata", c.seed, title, year)
        i, how = self.resolve(title, year)
        if i is None:
            gs = [V.GENRE_NAMES[j] for j in rng.choice(len(V.GENRES), size=int(rng.integers(1, 3)), replace=False)]
            pool = [k for g in V.GENRES if g.name in gs for k in g.keywords]
            keywords = [pool[j] for j in rng.choice(len(pool), size=min(4, len(pool)), replace=False)]
            year = year or int(rng.integers(1950, 2025))
            plot = make_plot(rng, gs, keywords, year)
        else:
            it = w.catalog[i]
            year = year or it.year
            genres = it.meta.get("genres", [])
            pool = [k for g in V.GENRES if g.name in genres for k in g.keywords] or list(V.KEYWORDS)
            # a hallucinated film is described less faithfully than a misspelled real one
            noise = min(1.0, (2 if how in ("invented", "similar") else 1) * c.metadata_noise)
            keywords = [k if rng.random() >= noise else pool[int(rng.integers(len(pool)))]
                        for k in it.meta.get("keywords", [])]
            keywords = list(dict.fromkeys(keywords))
            well_known = how == "exact" and self._pop_quantile[i] >= 0.2   # obscure films get a vaguer plot
            plot = it.meta.get("plot") if well_known and it.meta.get("plot") else make_plot(rng, genres, keywords,
                                                                                              it.year)
        return f"{title} ({year})\nKeywords: {', '.join(keywords)}\nPlots: {plot}"

    # -- (c) judge

    def rate(self, rank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Ratings -2..2 from belief ranks (0 = best): round(2.5 - log2(rank + 1) / 2 + noise), clipped.

        Without noise: rank 0-3 -> 2, 4-15 -> 1, 16-63 -> 0, 64-255 -> -1, beyond -> -2."""
        v = 2.5 - np.log2(rank + 1.0) / 2.0 + self.config.judge_noise * rng.standard_normal(len(rank))
        return np.clip(np.floor(v + 0.5), -2, 2).astype(int)

    def judge(self, conversation: str, candidates: list[tuple[str, int | None]], request: str = "") -> str:
        """One "title (year)####rating" line per candidate, a few missing or malformed."""
        c = self.config
        b = self.belief(conversation)
        rank_of = np.empty(len(b), dtype=np.int64)
        rank_of[np.argsort(-b, kind="stable")] = np.arange(len(b))
        rng = rng_for("judge", c.seed, request or conversation, tuple(candidates))
        ranks = []
        for title, year in candidates:
            i, _ = self.resolve(title, year)
            ranks.append(rank_of[i] if i is not None else len(b))
        ratings = self.rate(np.array(ranks, dtype=float), rng)
        lines = []
        for (title, year), r in zip(candidates, ratings):
            name = f"{title} ({year})" if year is not None else title
            if rng.random() < c.judge_slip_rate:
                kind = int(rng.integers(3))
                if kind == 0:
                    continue                                 # line left out
                lines.append(f"{name}: {r}" if kind == 1 else f"{name} - rating {r}/2")
            else:
                lines.append(f"{name}####{r}")
        return "\n".join(lines)

