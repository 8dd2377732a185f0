"""Remap-Reflect-Adjust (Eq. 10-13) on hand examples, the judge parser, the embedders, and a
tiny end-to-end run with a scripted teacher."""
import ast
import doctest
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
import transformers

from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.data import Example, build_prompt
from rankgrpo.demos import embed, pipeline, replies, rra
from rankgrpo.demos.embed import HashingEmbedder, cached_embed, hashed_ngram_counts, make_embedder
from rankgrpo.demos.pipeline import RRAConfig, catalog_metadata_text, format_demo, run_rra, seen_indices
from rankgrpo.demos.replies import (
    parse_judge_line, parse_judge_reply, parse_metadata_reply, parse_teacher_list, validate_judge_reply,
)
from rankgrpo.demos.rra import (
    adjust_loss, adjust_scores, fit_adjust, positional_weights, ratings_vector, reflect_scores, remap_scores,
    remap_scores_batched, top_n,
)
from rankgrpo.demos.teacher import CachedTeacher, ChatTeacher
from rankgrpo.parsing import parse_recommendations


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("module", [rra, replies, pipeline, embed], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_the_equations_module_needs_only_torch():
    """rra.py holds the equations as pure tensor functions: no teacher, catalog, file or parsing code."""
    tree = ast.parse(open(rra.__file__, encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "math", "typing", "torch"}


# ----------------------------------------------------------------------------- Eq. 10


def test_positional_weights_are_one_over_sqrt_rank():
    assert positional_weights(torch.tensor([1, 2, 4, 9])).tolist() == pytest.approx([1, 2 ** -0.5, 0.5, 1 / 3])


def test_remap_hand_example():
    # Teacher items u0 (rank 1, is catalog 1), u1 (rank 4, out of catalog), u2 (rank 16, is catalog 3).
    p = positional_weights(torch.tensor([1, 4, 16]))  # [1, 0.5, 0.25]
    S = torch.tensor([[0.5, 1.0, 0.0, 0.0],
                      [0.0, 0.0, 0.8, 0.5],
                      [0.0, 0.0, 0.0, 1.0]])
    I = torch.tensor([[0.0, 1, 0, 0],
                      [0.0, 0, 0, 0],
                      [0.0, 0, 0, 1]])
    s_context = torch.tensor([0.2, 0.0, 0.1, 0.0])
    # c0: 1*0.5 + 0.2 = 0.7        c1: 1*(1 + 1) = 2
    # c2: 0.5*0.8 + 0.1 = 0.5      c3: 0.5*0.5 + 0.25*(1 + 1) = 0.75
    assert remap_scores(p, S, I, s_context).tolist() == pytest.approx([0.7, 2.0, 0.5, 0.75])
    # lambda scales only the context term
    assert remap_scores(p, S, I, s_context, lam=0.0).tolist() == pytest.approx([0.5, 2.0, 0.4, 0.75])


def test_batched_remap_equals_per_conversation_remap():
    g = torch.Generator().manual_seed(0)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    d, C, n_ooc = 16, 7, 3
    catalog_emb = unit(torch.randn(C, d, generator=g))
    item_emb = torch.cat([catalog_emb, unit(torch.randn(n_ooc, d, generator=g))])
    context = unit(torch.randn(2, d, generator=g))
    # conversation 0: catalog 2 (rank 1), ooc 1 (rank 2), catalog 5 (rank 5); conversation 1: ooc 0, ooc 2
    conv = torch.tensor([0, 0, 0, 1, 1])
    item_row = torch.tensor([2, C + 1, 5, C + 0, C + 2])
    ranks = torch.tensor([1, 2, 5, 1, 3])
    cat_idx = torch.tensor([2, -1, 5, -1, -1])
    batched = remap_scores_batched(context, item_emb, catalog_emb, conv, item_row, positional_weights(ranks),
                                   cat_idx, lam=0.7)
    for i in range(2):
        mine = conv == i
        S = item_emb[item_row[mine]] @ catalog_emb.T
        I = torch.zeros_like(S)
        for u, j in enumerate(cat_idx[mine].tolist()):
            if j >= 0:
                I[u, j] = 1
        expected = remap_scores(positional_weights(ranks[mine]), S, I, context[i] @ catalog_emb.T, lam=0.7)
        torch.testing.assert_close(batched[i], expected)


CATALOG = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979), CatalogItem("Aliens", 1986),
                   CatalogItem("Heat", 1972), CatalogItem("Ran", 1985)])


def test_teacher_list_identity_year_rule_duplicates_and_ranks():
    reply = "\n".join([
        "Sure! Here are some movies:",   # no year: dropped, does not take a rank
        "1. Heat (1995)",                # rank 1, catalog 0 (exact year preferred over Heat 1972)
        "**Aliens (1987)**",             # rank 2, catalog 2 (year off by one: within tolerance)
        "HEAT (1996)",                   # rank 3, the same catalog item as rank 1: duplicate, dropped
        "Alienz (1979)",                 # rank 4, out of catalog
        "alienz (1979)",                 # rank 5, the same out-of-catalog item: dropped
        "Ran (1989)",                    # rank 6, year off by 4: out of catalog
        "Heat (1973)",                   # rank 7, catalog 3 (nearest year within 2)
    ])
    items = parse_teacher_list(reply, CATALOG)
    assert [(t.rank, t.title, t.year, t.catalog_index) for t in items] == [
        (1, "Heat", 1995, 0), (2, "Aliens", 1987, 2), (4, "Alienz", 1979, None), (6, "Ran", 1989, None),
        (7, "Heat", 1973, 3)]
    assert [t.rank for t in parse_teacher_list(reply, CATALOG, max_items=3)] == [1, 2]
    assert [t.catalog_index for t in parse_teacher_list(reply, CATALOG, year_tolerance=0)] == [0, None, None, None,
                                                                                             None, None]


# ----------------------------------------------------------------------------- Eq. 11


def test_reflect_hand_example():
    s_remap = torch.tensor([0.7, 2.0, 0.5, 0.75])
    # the judge rated candidates 1 (-2), 3 (+2) and 0 (0); catalog 2 was not a candidate
    r = ratings_vector([[1, 3, 0]], [[-2.0, 2.0, 0.0]], 4)
    assert r.tolist() == [[0.0, -2.0, 0.0, 2.0]]
    assert reflect_scores(s_remap, r[0]).tolist() == pytest.approx([0.7, 1.0, 0.5, 1.75])
    assert reflect_scores(s_remap, r[0], gamma=1.0).tolist() == pytest.approx([0.7, 0.0, 0.5, 2.75])


def test_judge_parser_on_messy_replies():
    candidates = [("Heat", 1995), ("Alien", 1979), ("Aliens", 1986), ("Heat", 1972), ("Ran", 1985),
                  ("2001: A Space Odyssey", 1968), ("Se7en", 1995), ("Up", 2009)]
    reply = "\n".join([
        "Here are my ratings:",                         # no rating: unparsed
        "",                                             # blank: ignored
        "1. **Heat (1995)**####2",                      # Heat 1995 -> 2
        "- \"Alien (1979)\" #### \u22121 (not good)",   # unicode minus -> -1
        "Aliens (1987)####5",                           # year off by one; 5 clipped to 2
        "Heat (1995)####-2",                            # repeated: the first rating wins
        "2001: A Space Odyssey (1968): great",          # no ####, rating word
        "se7en####1.5",                                 # no year, unique title, fractional
        "Ran (1985)",                                   # no rating: unparsed, Ran missing
        "Heat####1",                                    # ambiguous title without year: unparsed
        "Titanic (1997)####2",                          # not a candidate: unparsed
        "Up (2009)####-7",                              # clipped to -2
    ])
    r = parse_judge_reply(reply, candidates)
    assert r.ratings == [2.0, -1.0, 2.0, 0.0, 0.0, 2.0, 1.5, -2.0]
    assert (r.n_rated, r.n_missing, r.n_unparsed) == (6, 2, 4)
    assert parse_judge_reply("", candidates).n_missing == len(candidates)
    assert parse_judge_reply("I cannot rate these.\n\x00\x01garbage", candidates).n_rated == 0
    assert parse_judge_reply("Heat (1995)####2", candidates, scale=1).ratings[0] == 1.0
    assert parse_judge_line("Heat (1995)####") is None
    assert validate_judge_reply("Heat (1995)####1") is None
    assert validate_judge_reply("no ratings at all") is not None


# ----------------------------------------------------------------------------- Eq. 12-13


def test_adjust_hand_example():
    s = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    w = torch.tensor([2.0, 1.0, 1.0, 1.0])
    b = torch.tensor([0.0, 0.0, 0.0, math.log(2)])
    assert adjust_scores(s[0], w, b).tolist() == pytest.approx([2.0, 0.0, 0.0, math.log(2)])
    # logits [2, 0, 0, ln 2]: NLL of catalog 0 = ln(e^2 + 1 + 1 + 2) - 2
    nll = math.log(math.e ** 2 + 4) - 2
    assert adjust_loss(s, torch.tensor([[0]]), w, b).item() == pytest.approx(nll + 0.01 * 1 + 0.01 * math.log(2) ** 2)
    # two ground truths (padding -1 ignored), other lambdas
    two = adjust_loss(s, torch.tensor([[0, 3, -1]]), w, b, lambda_w=0.5, lambda_b=0.0).item()
    assert two == pytest.approx(nll + (math.log(math.e ** 2 + 4) - math.log(2)) + 0.5)
    # w = 1, b = 0 on equal scores: -log(1/4), no regularisation
    assert adjust_loss(torch.zeros(1, 4), torch.tensor([[2]]), torch.ones(4), torch.zeros(4)).item() == \
        pytest.approx(math.log(4))


def test_adjust_loss_matches_a_loop_over_ground_truths():
    g = torch.Generator().manual_seed(1)
    s, w, b = torch.randn(3, 6, generator=g), torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    gt = torch.tensor([[0, 5, -1], [2, 2, 4], [-1, -1, -1]])
    expected = 0.0
    for i in range(3):
        for j in gt[i].tolist():
            if j >= 0:
                expected -= torch.log_softmax(w * s[i] + b, 0)[j].item()
    expected += 0.01 * ((w - 1) ** 2).sum().item() + 0.01 * (b ** 2).sum().item()
    assert adjust_loss(s, gt, w, b).item() == pytest.approx(expected, rel=1e-5)


def _recall_at(scores: torch.Tensor, gt: torch.Tensor, k: int) -> float:
    top = scores.topk(k, dim=1).indices
    hits = (top[:, :, None] == gt[:, None, :]).any(1).sum(1).float()
    return float((hits / (gt >= 0).sum(1)).mean())


def test_adjust_recovers_a_planted_popularity_bias():
    g = torch.Generator().manual_seed(0)
    n, C, alpha = 3000, 40, 2.0
    relevance = torch.randn(n, C, generator=g)
    gt = torch.multinomial(torch.softmax(alpha * relevance, 1), 2, generator=g)  # two ground truths each
    bias = torch.zeros(C)
    bias[:8] = 1.5   # eight over-promoted items (the teacher's popularity bias)
    bias[-8:] = -1.0  # eight under-promoted ones
    s_reflect = relevance + bias
    w, b, info = fit_adjust(s_reflect[:2000], gt[:2000])
    assert info["objective_end"] < info["objective_start"]
    # the optimum is w = alpha, b = -alpha * bias (+ a constant)
    corr = np.corrcoef(b.numpy(), -bias.numpy())[0, 1]
    assert corr > 0.95
    assert float(w.mean()) == pytest.approx(alpha, abs=0.3)
    held_out_before = _recall_at(s_reflect[2000:], gt[2000:], 5)
    held_out_after = _recall_at(adjust_scores(s_reflect[2000:], w, b), gt[2000:], 5)
    assert held_out_after > held_out_before + 0.05


def test_adjust_without_ground_truth_is_the_identity():
    w, b, info = fit_adjust(torch.randn(3, 4), torch.full((3, 2), -1))
    assert w.tolist() == [1.0] * 4 and b.tolist() == [0.0] * 4 and info["events"] == 0


# ----------------------------------------------------------------------------- top-N, metadata


def test_top_n_excludes_seen_titles_of_any_year():
    seen = seen_indices(["heat", "Nope"], CATALOG)  # both Heat films; "Nope" is not in the catalog
    assert seen == [0, 3]
    scores = torch.tensor([[5.0, 1.0, 2.0, 4.0, 3.0]])
    assert top_n(scores, [seen], 2) == [[4, 2]]
    assert top_n(scores, [seen], 10) == [[4, 2, 1]]  # fewer than asked when the catalog runs out
    assert format_demo([4, 2], CATALOG) == "Ran (1985)\nAliens (1986)"


def test_metadata_from_catalog_fields_and_teacher_replies():
    item = CatalogItem("Heat", 1995, {"genres": ["Crime", "Drama"], "keywords": "heist, los angeles",
                                      "plot": "A thief and a cop.", "director": "Michael Mann"})
    assert catalog_metadata_text(item) == ("Heat (1995)\nKeywords: Crime, Drama, heist, los angeles\n"
                                           "Plots: A thief and a cop. Directed by Michael Mann.")
    assert catalog_metadata_text(CatalogItem("Heat", 1995, {"popularity": 3})) is None
    assert parse_metadata_reply("Heat (1995)\nKeywords: a, b\nPlot: Two men.") == ("a, b", "Two men.")
    assert parse_metadata_reply("**Keywords:** heist\n**Plots:** A thief.") == ("heist", "A thief.")
    assert parse_metadata_reply("Sorry, I don't know this movie.") is None


# ----------------------------------------------------------------------------- embedders


def test_hashing_is_deterministic_across_processes_and_instances():
    counts = hashed_ngram_counts(["Heat (1995)"], dim=64)[0]
    # pinned: the same buckets on every machine and under any PYTHONHASHSEED
    assert np.nonzero(counts)[0].tolist() == [0, 3, 4, 5, 6, 17, 18, 22, 26, 30, 35, 36, 40, 42, 47, 48, 50,
                                              54, 58, 60, 62, 63]
    assert counts.sum() == 11 + 10 + 9  # 3-, 4- and 5-grams of " heat (1995) "
    texts = ["Heat (1995)\nKeywords: heist", "Alien (1979)\nKeywords: space", ""]
    a = HashingEmbedder(dim=256).fit(texts).embed(texts)
    b = make_embedder("hashing:256").fit(texts).embed(texts)
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a[:2], axis=1), 1.0) and not a[2].any()  # empty text: zero vector


def test_misspelled_title_is_nearest_its_original():
    titles = ["The Godfather (1972)", "The Godfather Part II (1974)", "Goodfellas (1990)", "Heat (1995)",
              "Alien (1979)", "Aliens (1986)", "Blade Runner (1982)", "Ratatouille (2007)", "Amélie (2001)",
              "Eternal Sunshine of the Spotless Mind (2004)", "2001: A Space Odyssey (1968)", "Se7en (1995)"]
    typos = ["The Godfater (1972)", "Godfather Part 2 (1974)", "Good Fellas (1990)", "Heat (1996)",
             "Alein (1979)", "Alienss (1986)", "Bladerunner (1982)", "Ratatoullie (2007)", "Amelie (2001)",
             "Eternal Sunshine of a Spotless Mind (2004)", "2001 A Space Odyssey (1968)", "Seven (1995)"]
    emb = HashingEmbedder().fit(titles)
    sims = emb.embed(typos) @ emb.embed(titles).T
    assert sims.argmax(1).tolist() == list(range(len(titles)))


def test_hf_embedder_mean_pools_over_the_mask_only(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path)
    emb = make_embedder(f"hf:{tmp_path}")
    alone = emb.embed(["heat (1995)"])
    batch = emb.embed(["a much longer text about the heat of a summer (1995)", "heat (1995)"])
    assert batch.shape == (2, 32) and np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert np.allclose(batch[1], alone[0], atol=1e-5)  # padding does not leak into the mean


def test_embedding_cache_reuses_and_repairs(tmp_path):
    emb = HashingEmbedder(dim=128)
    first = cached_embed(emb, ["a b c", "d e f"], tmp_path)
    files = list(tmp_path.glob("emb-*.npy"))
    assert len(files) == 1
    emb.embed = lambda texts: pytest.fail("should have been read from the cache")
    assert np.array_equal(cached_embed(emb, ["a b c", "d e f"], tmp_path), first)
    files[0].write_bytes(b"torn")
    del emb.embed  # back to the real method: a corrupt file is recomputed and rewritten
    assert np.array_equal(cached_embed(emb, ["a b c", "d e f"], tmp_path), first)


# ----------------------------------------------------------------------------- end to end


MOVIES = {
    ("Alien", 1979): "space, horror, creature, crew",
    ("Aliens", 1986): "space, horror, marines, creature",
    ("Event Horizon", 1997): "space, horror, ship, hell",
    ("The Thing", 1982): "antarctica, horror, creature, paranoia",
    ("Heat", 1995): "heist, crime, los angeles, detective",
    ("Ronin", 1998): "heist, crime, car chase, paris",
    ("The Town", 2010): "heist, crime, boston, robbery",
    ("Paddington", 2014): "family, bear, london, comedy",
    ("Up", 2009): "family, balloon, adventure, animation",
    ("Moon", 2009): "space, isolation, clone, drama",
}


def _catalog() -> Catalog:
    return Catalog([CatalogItem(t, y, {"keywords": k, "plot": f"A film about {k}."}) for (t, y), k in MOVIES.items()])


class ScriptedTeacher:
    """Answers the three prompts of RRA from a script keyed by words in the conversation."""

    LISTS = {
        "space": "1. Alienn (1979)\n2. Aliens (1986)\n3. Moon (2009)\n4. Sunshine (2007)",
        "heist": "Heet (1995)\nRonin (1998)\nThe Town (2010)",
        "family": "Paddington (2014)\nUp (2009)",
    }

    def __init__(self):
        self.calls = Counter()

    def chat(self, messages):
        text = messages[-1]["content"]
        if text.startswith("Summarize the metadata for the movie"):
            self.calls["metadata"] += 1
            title = re.match(r"Summarize the metadata for the movie (.+) \((\d{4})\)", text).group(1)
            keywords = {"Alienn": MOVIES[("Alien", 1979)], "Heet": MOVIES[("Heat", 1995)]}.get(title, "sun, space")
            return f"{title}\nKeywords: {keywords}\nPlots: A film about {keywords}."
        if "Here are the movie candidates:" in text:
            self.calls["judge"] += 1
            if "JUDGE-BROKEN" in text:
                return "I am unable to rate movies."
            cands = re.findall(r"^(.+ \(\d{4}\))$", text.split("Here are the movie candidates:")[1], re.M)
            return "\n".join(f"{c}####{2 if c.startswith('Event Horizon') else -1}" for c in cands)
        self.calls["list"] += 1
        for word, reply in self.LISTS.items():
            if word in text:
                return reply
        return "Sorry, I cannot recommend movies."


def _examples() -> list[Example]:
    rows = [
        ("USER: I loved Alien, more space horror please\n", ["Alien"], [("Event Horizon", 1997)]),
        ("USER: a great heist movie like Heat?\n", ["Heat"], [("Ronin", 1998), ("The Town", 2010)]),
        ("USER: family night, something fun\n", [], [("Up", 2009)]),
        ("USER: tell me a joke\n", [], [("Up", 2009)]),  # the teacher never gives a list: skipped
        ("USER: space again JUDGE-BROKEN\n", [], [("Moon", 2009)]),  # the judge never answers: skipped
    ]
    return [Example(str(i), [{"role": "user", "content": build_prompt(c)}], seen, gt)
            for i, (c, seen, gt) in enumerate(rows)]


def test_run_rra_end_to_end_with_a_scripted_teacher(tmp_path):
    catalog, examples, script = _catalog(), _examples(), ScriptedTeacher()
    cfg = RRAConfig(n_items=5, n_reflect=6, adjust_steps=20)
    result = run_rra(examples, catalog, ChatTeacher(script, "script"), HashingEmbedder(dim=1024), cfg,
                     fit_adjust_on=[True, True, True, True, False], cache_dir=tmp_path)
    s = result.stats
    assert (s["list_failures"], s["judge_failures"], s["demonstrations"], s["skipped"]) == (1, 1, 3, 2)
    assert s["out_of_catalog_items_unique"] == 3  # Alienn, Sunshine, Heet
    assert script.calls["list"] == 5 + 2 and script.calls["judge"] == 4 + 2  # failures retried (3 tries)
    assert result.completions[3] is None and result.completions[4] is None
    index = {(it.title, it.year): j for j, it in enumerate(catalog)}
    for i in range(3):
        items = parse_recommendations(result.completions[i])
        assert len(items) == 5 and all(it.exact for it in items)
        assert not {it.title for it in items} & set(examples[i].seen_titles)  # seen titles never recommended
    # Remap: the misspelled "Heet (1995)" is mapped onto Heat, then excluded as seen; the remaining
    # heist films lead. "Alienn" maps onto Alien (seen) and pulls its neighbours up.
    assert set(result.remap_top[1][:2]) == {index[("Ronin", 1998)], index[("The Town", 2010)]}
    assert index[("Aliens", 1986)] in result.remap_top[0][:2]
    # Reflect: the judge's +2 for Event Horizon (everything else -1) puts it first
    assert result.reflect_top[0][0] == index[("Event Horizon", 1997)]
    assert result.teacher_lists[0][0].catalog_index is None and result.teacher_lists[0][1].catalog_index == 1
    assert result.w.shape == result.b.shape == (len(catalog),) and s["adjust_events"] == 4


def test_run_rra_rerun_from_cache_makes_no_teacher_calls(tmp_path):
    catalog, examples = _catalog(), _examples()[:3]
    cfg = RRAConfig(n_items=5, n_reflect=6, adjust_steps=20)
    first_script, second_script = ScriptedTeacher(), ScriptedTeacher()
    first = run_rra(examples, catalog, CachedTeacher(ChatTeacher(first_script, "script"), tmp_path / "t.jsonl"),
                    HashingEmbedder(dim=1024), cfg, cache_dir=tmp_path)
    second = run_rra(examples, catalog, CachedTeacher(ChatTeacher(second_script, "script"), tmp_path / "t.jsonl"),
                     HashingEmbedder(dim=1024), cfg, cache_dir=tmp_path)
    assert sum(first_script.calls.values()) > 0 and sum(second_script.calls.values()) == 0
    assert first.completions == second.completions


class SilentTeacher:
    def chat(self, messages):
        return "no."


def test_run_rra_when_every_teacher_reply_is_garbage_skips_everything_without_crashing():
    result = run_rra(_examples(), _catalog(), ChatTeacher(SilentTeacher(), "silent"), HashingEmbedder(dim=256),
                     RRAConfig(n_items=5, n_reflect=6, adjust_steps=5))
    assert result.completions == [None] * 5
    assert result.stats["list_failures"] == 5 and result.stats["skipped"] == 5
    assert result.stats["failure_reasons"] == {"list: invalid reply: no 'Title (YYYY)' line": 5}
