"""Knowledge pretraining of the sandbox base model: a causal-LM stage on text the world writes
about itself, so the base model knows its films as a pretrained LLM knows real ones.

The corpus (``knowledge_corpus``) has two kinds of documents, and nothing else:

* film facts, one paragraph per film and rendering: title and year, genres (in the words users
  use: "creepy", "sci-fi"), decade, director, keywords, how widely seen it is, its plot.
  Rendered ``fact_renderings`` times with different wording;
* co-preference sentences, "People who liked A (1987) also liked B (1992) and C (1985).": for
  a fresh latent taste drawn from the world's taste model (``sample_taste``, its own random
  stream), films drawn from ``softmax(s / temperature)`` as a ground truth would be.

No recommendation-format lists (one "Title (Year)" per line), no prompt text, and no row of any
split: the co-preference tastes are new draws, so a test conversation's ground truth can not
be read from the corpus beyond what the world's public structure (genres, eras, directors,
popularity) already implies. ``pretrain_base_model`` trains on it with packed blocks of
``seq_len`` tokens (documents separated by ``<|endoftext|>``), AdamW, cosine schedule;
deterministic from the seed, the global torch RNG untouched.

Worked example of the cost (200 films, 2.2M parameters, 300 steps of 16 x 128 tokens =
0.6M tokens): a few minutes on 2 CPU cores; ``build_world`` records the seconds and the loss
in ``base_model/pretrain.json``.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from rankgrpo.sandbox import vocab as V
from rankgrpo.sandbox.world import (
    World,
    era_phrase,
    rng_for,
    sample_taste,
    sample_without_replacement,
)

_GENRE = {g.name: g for g in V.GENRES}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _name(world: World, i: int) -> str:
    it = world.catalog[i]
    return f"{it.title} ({it.year})"


def film_facts(world: World, i: int, rng: np.random.Generator) -> str:
    """One paragraph of facts about film ``i`` in randomly chosen wording, e.g.

    "The Silent Harbor (1987) is a creepy horror film from the 80s, directed by Ruby Okafor.
    It is a well-known film. Keywords: haunted house, slasher. A retired detective in ..."."""
    it = world.catalog[i]
    genres = [g for g in it.meta.get("genres", ()) if g in _GENRE]
    phrase = _join([_pick(rng, _GENRE[g].synonyms) for g in genres]) if genres else "feature"
    mood = _pick(rng, _GENRE[genres[0]].moods) if genres else "memorable"
    decade = it.year // 10 * 10
    era = _pick(rng, (f"the {decade}s", f"the {decade % 100:02d}s", f"{it.year}"))
    z = world.log_pop_z[i]
    fame = ("one of the most watched films of its time" if z > 1.0 else "a well-known film" if z > 0.0
            else "a lesser-known film" if z > -1.0 else "an obscure film")
    director = it.meta.get("director", "")
    keywords = list(it.meta.get("keywords", ()))
    name = _name(world, i)
    first = _pick(rng, (
        f"{name} is a {mood} {phrase} film from {era}, directed by {director}.",
        f"{director} directed {name}, a {phrase} film from {era}.",
        f"Released in {it.year}, {name} is a {phrase} film by {director}.",
    ))
    parts = [first, f"It is {fame}."]
    if keywords:
        kws = list(keywords)
        rng.shuffle(kws)
        parts.append(_pick(rng, (f"Keywords: {', '.join(kws)}.", f"It features {_join(kws)}.",
                                 f"Expect {_join(kws)}.")))
    if rng.random() < 0.5 and it.meta.get("plot"):
        parts.append(str(it.meta["plot"]))
    return " ".join(parts)


def co_preference(world: World, rng: np.random.Generator) -> str:
    """One sentence drawn from the taste model: a fresh taste, then 2..4 films drawn without
    replacement from softmax(s / temperature) (as ground truths are); the first is "liked",
    the rest "also liked". Sometimes the taste's words come first ("Fans of 80s horror ...")."""
    c = world.config
    date = float(rng.uniform(c.start_year, c.end_year))
    taste = sample_taste(rng, world, date)
    films = [int(i) for i in sample_without_replacement(world.relevance(taste) / c.temperature,
                                                         int(rng.integers(2, 5)), rng)]
    if len(films) < 2:
        return ""
    first, rest = _name(world, films[0]), _join([_name(world, i) for i in films[1:]])
    if rng.random() < 0.3:
        words = _join([_pick(rng, _GENRE[g].synonyms) for g in taste.genres])
        if taste.era is not None:
            words = f"{era_phrase(rng, taste.era, date)} {words}"
        return f"Fans of {words} who liked {first} also liked {rest}."
    return _pick(rng, (f"People who liked {first} also liked {rest}.",
                       f"If you enjoyed {first}, you may also enjoy {rest}.",
                       f"Viewers of {first} often watch {rest} too."))


def catalog_lists(world: World, top: int = 10) -> list[str]:
    """Catalog facts written one "Title (Year)" a line, as reference pages list films: each
    director's films by year, and the ``top`` most watched films of each genre and decade, e.g.

    "Horror films of the 1980s, most watched first:\nThe Cellar (1984)\nBlood Ritual (1981)"

    They depend on the catalog alone (no taste, no conversation)."""
    docs = []
    for d, name in enumerate(world.directors):
        films = sorted(np.flatnonzero(world.director_ids == d), key=lambda i: (world.years[i], world.catalog[i].title))
        if films:
            docs.append(f"Films directed by {name}:\n" + "\n".join(_name(world, int(i)) for i in films))
    decades = sorted({int(y) // 10 * 10 for y in world.years})
    for j, genre in enumerate(V.GENRE_NAMES):
        for decade in decades:
            members = np.flatnonzero((world.genre_matrix[:, j] > 0) & (world.years // 10 * 10 == decade))
            if len(members):
                best = members[np.argsort(-world.popularity[members], kind="stable")][:top]
                docs.append(f"{genre} films of the {decade}s, most watched first:\n"
                            + "\n".join(_name(world, int(i)) for i in best))
    return docs


def chat_question(world: World, rng: np.random.Generator, max_items: int = 20) -> str:
    """One chat turn of catalog questions and answers, the instruction tuning a chat LLM has: a
    user asks for films by director, by genre (and decade) or by plot keyword, in the words users
    use; the assistant answers from the catalog alone, one "Title (Year)" a line, most watched
    first (a director's films by year), at most ``max_items`` lines. In ChatML, e.g.

        <|im_start|>user
        Which creepy films came out in the 80s?<|im_end|>
        <|im_start|>assistant
        The Cellar (1984)
        Blood Ritual (1981)<|im_end|>

    No taste and no conversation is involved: what it teaches is the answer format and the
    catalog's public facts, not what any user would like."""
    kind = int(rng.integers(3))
    if kind == 0:
        d = int(rng.integers(len(world.directors)))
        members = np.flatnonzero(world.director_ids == d)
        members = sorted(members, key=lambda i: (world.years[i], world.catalog[i].title))
        name = world.directors[d]
        question = _pick(rng, (f"Which films did {name} direct?", f"List the films of {name}.",
                               f"What has {name} directed?"))
    elif kind == 1:
        j = int(rng.integers(len(V.GENRE_NAMES)))
        g = V.GENRES[j]
        words = _pick(rng, g.synonyms)
        mask = world.genre_matrix[:, j] > 0
        if rng.random() < 0.5:
            decade = int(_pick(rng, sorted({int(y) // 10 * 10 for y in world.years})))
            mask &= world.years // 10 * 10 == decade
            question = _pick(rng, (f"Which {words} films came out in the {decade}s?",
                                   f"List the most watched {words} films of the {decade % 100:02d}s."))
        else:
            question = _pick(rng, (f"What are the most watched {words} films?", f"List some {words} movies.",
                                   f"Name popular {g.name.lower()} films."))
        members = np.flatnonzero(mask)
        members = members[np.argsort(-world.popularity[members], kind="stable")]
    else:
        k = int(rng.integers(len(V.KEYWORDS)))
        members = np.flatnonzero(world.keyword_matrix[:, k] > 0)
        members = members[np.argsort(-world.popularity[members], kind="stable")]
        question = _pick(rng, (f"Which films feature {V.KEYWORDS[k]}?", f"Name some movies with {V.KEYWORDS[k]}."))
    if len(members) == 0:
        return ""
    answer = "\n".join(_name(world, int(i)) for i in list(members)[:max_items])
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"


def knowledge_corpus(world: World, *, fact_renderings: int, co_preference_sentences: int, lists: bool = False,
                     chat_questions: int = 0, seed: int = 0) -> list[str]:
    """The pretraining documents in a fixed, shuffled order (deterministic from ``seed``):
    ``fact_renderings`` fact paragraphs per film, ``co_preference_sentences`` sentences, with
    ``lists`` the ``catalog_lists`` (``fact_renderings`` copies), and ``chat_questions`` chat
    turns of ``chat_question`` (drawn from their own stream, so adding them changes no other
    document)."""
    rng = rng_for("pretrain-corpus", seed)
    docs = [film_facts(world, i, rng) for _ in range(fact_renderings) for i in range(len(world.catalog))]
    docs += [s for s in (co_preference(world, rng) for _ in range(co_preference_sentences)) if s]
    if lists:
        docs += catalog_lists(world) * fact_renderings
    if chat_questions:
        chat_rng = rng_for("pretrain-chat", seed)
        docs += [s for s in (chat_question(world, chat_rng) for _ in range(chat_questions)) if s]
    order = rng.permutation(len(docs))
    return [docs[j] for j in order]


def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Token ids of ``docs`` joined by ``<|endoftext|>`` and cut into blocks: int64 [n_blocks, seq_len]
    (the ragged tail is dropped)."""
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(sep)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pretraining corpus has {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token NLL (nats per token) of ``model`` on ``blocks`` [n, L]."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for j in range(0, len(blocks), batch_size):
        b = blocks[j:j + batch_size]
        loss = model(input_ids=b, labels=b).loss
        total += loss.item() * b.numel()
        count += b.numel()
    model.train(was_training)
    return total / count


def pretrain_base_model(model, tokenizer, world: World, *, steps: int, lr: float, batch_size: int, seq_len: int,
                        fact_renderings: int, co_preference_sentences: int, lists: bool = False,
                        chat_questions: int = 0, seed: int = 0, progress: bool = False) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps of causal LM on ``knowledge_corpus``.

    Blocks are visited in a fresh permutation per epoch drawn from (seed, epoch). Learning rate:
    5% linear warm-up, then cosine to 0. ``progress`` shows a progress bar. Returns the record
    written to ``base_model/pretrain.json``: steps, tokens seen, corpus size, first/last training
    loss (the last is a mean of the last 10 steps), seconds."""
    docs = knowledge_corpus(world, fact_renderings=fact_renderings,
                            co_preference_sentences=co_preference_sentences, lists=lists,
                            chat_questions=chat_questions, seed=seed)
    blocks = pack(tokenizer, docs, seq_len)
    t0 = time.perf_counter()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warm = max(1, int(0.05 * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        for _ in tqdm(range(steps), desc="knowledge pretraining", disable=not progress, dynamic_ncols=True):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(blocks), generator=gen), 0
                if len(order) < batch_size:
                    order = order.repeat(math.ceil(batch_size / len(order)))
            b = blocks[order[pos:pos + batch_size]]
            pos += batch_size
            loss = model(input_ids=b, labels=b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
    return {"steps": steps, "tokens_seen": steps * batch_size * seq_len, "corpus_documents": len(docs),
            "corpus_tokens": int(blocks.numel()), "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-10:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}
