"""The default scoring is the authors' ``evaluate_direct_match`` (libs/metrics.py) and in-catalog ratio.

The reference at the top of this file is written from the authors' rules alone and imports
nothing from ``rankgrpo``: its own parser, filters, matching loop, DCG and in-catalog rule.
It is held against our default scoring three ways:

* a checked-in fixture (``fixtures/evaluate_direct_match.json``): synthetic rows with the
  flaws models write and the reference's outputs, run in every CI;
* the authors' Reddit-v2 sample with flawed lists made from its demonstrations (needs
  RANKGRPO_REDDIT_SAMPLE and RANKGRPO_REDDIT_CATALOG; skipped when they are unset);
* hand-derived cases: |GT| > k, duplicates on both sides, the year tie-break, empty lists.

Regenerate the fixture (only when the reference or the rows change on purpose):
``python tests/unit/test_eval_protocol.py --write-fixture``.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import sys
from pathlib import Path

import pytest

KS = (5, 10, 15, 20)
FIXTURE = Path(__file__).parent / "fixtures" / "evaluate_direct_match.json"


# ============================================================================ the reference (authors' code)


def ref_parse(text: str) -> list[tuple[str, int]]:
    """``process_rec_raw``: collapse newline runs, drop empty lines, clean, keep lines "Title (YYYY)"."""
    out = []
    for line in re.sub(r"\n+", "\n", text).split("\n"):
        line = " ".join(line.split())
        if not line:
            continue
        while True:  # markdown marks at both ends and "1." / "1)" numbering, repeatedly
            new = line.strip("*_-# ")
            new = re.sub(r"^\d+[.)] +", "", new)
            if new == line:
                break
            line = new
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
            line = line[1:-1]
        m = re.match(r"(.+?)\s+\((\d{4})\)", line)
        if not m:
            continue
        title = m.group(1)
        while True:
            new = " ".join(re.sub(r"\([^()]*\)", "", title).split())
            if new == title:
                break
            title = new
        out.append((title, int(m.group(2))))
    return out


def ref_evaluate_direct_match(recs, k, seen_titles, groundtruths, catalog_pairs) -> tuple[float, float]:
    """``libs/metrics.py::evaluate_direct_match``: (Recall@k, NDCG@k) of one sample."""
    catalog = set(catalog_pairs)
    recs = [r for r in recs if r[0] not in seen_titles]          # exact title string
    recs = [r for r in recs if (r[0], int(r[1])) in catalog]     # exact (title, int year)
    if not recs:
        return 0.0, 0.0
    hit = [0] * len(recs)
    for gt_title, gt_year in groundtruths:                      # each GT marks its first match
        for i, (title, year) in enumerate(recs):
            if title == gt_title and abs(int(gt_year) - int(year)) <= 2:
                hit[i] = 1
                break

    def dcg(h):
        return sum(h[i] / math.log2(i + 2) for i in range(min(k, len(h))))

    ideal = [1 if i < len(groundtruths) else 0 for i in range(len(recs))]
    return sum(hit[:k]) / len(groundtruths), dcg(hit) / dcg(ideal)


def ref_in_catalog(recs, catalog_pairs) -> float:
    """``evaluate/eval_grpo_val.py``: first 20 parsed items; lower-cased title equal, year within 2."""
    years: dict[str, list[int]] = {}
    for title, year in catalog_pairs:
        years.setdefault(title.lower(), []).append(int(year))
    first = recs[:20]
    if not first:
        return 0.0
    return sum(any(abs(y - cy) <= 2 for cy in years.get(t.lower(), [])) for t, y in first) / len(first)


def ref_scores(completion, seen_titles, groundtruths, catalog_pairs) -> dict:
    recs = ref_parse(completion)
    out = {}
    for k in KS:
        out[f"recall@{k}"], out[f"ndcg@{k}"] = ref_evaluate_direct_match(recs, k, seen_titles, groundtruths,
                                                                         catalog_pairs)
    out["in_catalog"] = ref_in_catalog(recs, catalog_pairs)
    return out


# ============================================================================ flawed lists, as models write them

PREAMBLES = ["Here are some movies you might enjoy:", "Sure! Based on what you liked, try these:",
             "Recommendations:"]


def flaw_list(rng: random.Random, base: list[tuple[str, int]], seen_titles, extra_pool) -> str:
    """A list text with the flaws of real model output, from a clean ``base`` list.

    Lower-cased titles, years off by one, double inner spaces, markdown bold, seen titles, an
    invented film, repeated items, and per list: numbering, double spacing, a preamble.
    """
    items = []
    for title, year in base:
        r = rng.random()
        if r < 0.15:
            title = title.lower()
        elif r < 0.25:
            year = year + rng.choice([-1, 1])
        items.append((title, year))
    for title in seen_titles[:2]:
        if rng.random() < 0.7:
            items.insert(rng.randrange(len(items) + 1), (title, rng.choice([1999, 2004, 2012])))
    if rng.random() < 0.5:
        items.insert(rng.randrange(len(items) + 1), ("The Invented Film", 2031 - rng.randrange(40)))
    for _ in range(rng.choice([0, 1, 2])):
        if items:
            items.insert(rng.randrange(len(items) + 1), rng.choice(items))
    for _ in range(rng.choice([0, 2, 4])):
        items.append(rng.choice(extra_pool))
    numbered, double, preamble = rng.random() < 0.5, rng.random() < 0.4, rng.random() < 0.5
    lines = []
    for i, (title, year) in enumerate(items, 1):
        line = f"{title} ({year})"
        if rng.random() < 0.1:
            line = line.replace(" ", "  ", 1)
        if rng.random() < 0.15:
            line = f"**{line}**"
        if numbered:
            line = f"{i}. {line}"
        lines.append(line)
    text = ("\n\n" if double else "\n").join(lines)
    if preamble:
        text = rng.choice(PREAMBLES) + "\n\n" + text
    return text


def synthetic_rows(n_rows: int, seed: int = 0):
    """Catalog and rows for the fixture: the flawed lists above plus hand-made edge rows."""
    rng = random.Random(seed)
    words = ["Heat", "Alien", "Dune", "Ran", "Big Fish", "Se7en", "The Thing", "Up", "Her", "Arrival", "Zodiac",
             "Brazil", "Memento", "Oldboy", "Amélie", "Fargo", "Rocky", "Psycho", "Jaws", "Vertigo"]
    catalog = [(w, 1960 + (i * 7) % 60) for i, w in enumerate(words)]
    catalog += [("Dune", 1984), ("Dune", 1985), ("Dune", 1987), ("Dune", 2021), ("The Thing", 2011),
                ("Heat", 1986), ("HEAT", 1986), ("heat", 1995)]
    catalog = sorted(set(catalog))
    rows = []
    for i in range(n_rows):
        gt = rng.sample(catalog, rng.choice([1, 3, 5, 8]))
        if rng.random() < 0.2:
            gt.append(gt[0])                                  # a film named by two responders
        if rng.random() < 0.2:
            gt.append(("Not In The Catalog", 2001))           # counts in Recall's denominator
        seen = [t for t, _ in rng.sample(catalog, 2)] + (["heat"] if rng.random() < 0.3 else [])
        base = rng.sample(catalog, 12) + [g for g in gt if rng.random() < 0.6]
        rng.shuffle(base)
        rows.append({"id": f"syn{i}", "seen_titles": seen,
                     "groundtruth": [[t, str(y)] for t, y in gt],
                     "completion": flaw_list(rng, base, seen, catalog)})
    edge = [
        ("empty", "", [], [["Heat", "1986"]]),
        ("nothing survives", "Here you go:\n\nUp (1999)\nNope (2001)\nAlien", ["Up"], [["Alien", "1961"]]),
        ("dune tie-break", "Dune (1985)\nDune (1987)", [], [["Dune", "1984"], ["Dune", "1986"]]),
        ("case", "heat (1995)\nHeat (1986)\nHEAT (1986)", [], [["Heat", "1986"], ["heat", "1995"]]),
        ("seen is exact", "Heat (1986)\nheat (1995)", ["Heat"], [["Heat", "1986"], ["heat", "1995"]]),
        # Up (2009) is a catalog row, Up (2008) / (2010) are not: Zodiac, 26th parsed, shifts into the top 20
        ("more than 20 parsed", "Intro line\n\n" + "\n".join(f"Up ({2008 + j % 3})" for j in range(25))
         + "\nZodiac (1970)", ["Ran"], [["Zodiac", "1970"], ["Up", "2010"]]),
        ("GT > k", "\n".join(f"{t} ({y})" for t, y in catalog[:12]), [], [[t, str(y)] for t, y in catalog[:8]]),
    ]
    for name, text, seen, gt in edge:
        rows.append({"id": name, "seen_titles": seen, "groundtruth": gt, "completion": text})
    return catalog, rows


def write_fixture() -> None:
    catalog, rows = synthetic_rows(40)
    for row in rows:
        row["expected"] = ref_scores(row["completion"], row["seen_titles"], row["groundtruth"], catalog)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({"catalog": catalog, "rows": rows}, indent=1, ensure_ascii=False) + "\n")


# ============================================================================ our code from here on

from rankgrpo.catalog import Catalog, CatalogItem, load_catalog  # noqa: E402
from rankgrpo.data import example_from_json, load_examples  # noqa: E402
from rankgrpo.evaluation import score_examples  # noqa: E402
from rankgrpo.metrics import hits, in_catalog_ratio, ndcg_at_k, score_completion  # noqa: E402
from rankgrpo.parsing import parse_recommendations  # noqa: E402

METRICS = [f"recall@{k}" for k in KS] + [f"ndcg@{k}" for k in KS] + ["in_catalog"]


def ours(rows, catalog: Catalog, **kwargs) -> list[dict]:
    examples = [example_from_json({"prompt": "p", "id": r["id"], "seen_titles": r["seen_titles"],
                                   "groundtruth_with_release_year": r["groundtruth"]}, r["id"], r["id"])
                for r in rows]
    _, per_row = score_examples(examples, [r["completion"] for r in rows], catalog, **kwargs)
    return per_row


def assert_rows_equal(got: list[dict], expected: list[dict], ids) -> None:
    for g, e, i in zip(got, expected, ids, strict=True):
        for m in METRICS:
            assert g[m] == pytest.approx(e[m], abs=1e-12), f"row {i}: {m} ours {g[m]} reference {e[m]}"


def test_fixture_is_the_reference_output():
    """The stored expectations are what the reference computes (guards the reference itself)."""
    data = json.loads(FIXTURE.read_text())
    catalog = [tuple(p) for p in data["catalog"]]
    for row in data["rows"]:
        got = ref_scores(row["completion"], row["seen_titles"], row["groundtruth"], catalog)
        assert got == pytest.approx(row["expected"], abs=1e-12), row["id"]


def test_default_scoring_equals_the_reference_on_the_fixture():
    data = json.loads(FIXTURE.read_text())
    catalog = Catalog([CatalogItem(t, y) for t, y in data["catalog"]])
    rows = data["rows"]
    assert_rows_equal(ours(rows, catalog), [r["expected"] for r in rows], [r["id"] for r in rows])
    # the fixture exercises what it is meant to: flaws change the outcome under the lenient rule
    lenient = ours(rows, catalog, protocol="lenient")
    differ = [r["id"] for r, got in zip(rows, lenient) if any(abs(got[m] - r["expected"][m]) > 1e-9 for m in METRICS)]
    assert len(differ) >= 10, differ


SAMPLE = os.environ.get("RANKGRPO_REDDIT_SAMPLE")
CATALOG = os.environ.get("RANKGRPO_REDDIT_CATALOG")
needs_real = pytest.mark.skipif(not (SAMPLE and CATALOG), reason="RANKGRPO_REDDIT_SAMPLE/CATALOG not set")


class _PairsOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def real_rows_with_flaws(seed: int = 0):
    """The sample's rows with flawed lists made from their own demonstrations (the reference's view)."""
    with open(CATALOG, "rb") as f:
        catalog_pairs = [tuple(p) for p in _PairsOnly(f).load()]
    rng = random.Random(seed)
    pool = [p for p in catalog_pairs if 1900 <= p[1] <= 2030]
    rows = []
    with open(SAMPLE, encoding="utf-8") as f:
        for i, line in enumerate(f):
            obj = json.loads(line)
            demo = "".join(m["content"] for m in obj["completion"])
            base = ref_parse(demo)
            rows.append({"id": str(i), "seen_titles": obj["seen_titles"],
                         "groundtruth": obj["groundtruth_with_release_year"],
                         "completion": flaw_list(rng, base, obj["seen_titles"], pool)})
    return catalog_pairs, rows


@needs_real
def test_default_scoring_equals_the_reference_on_real_rows_with_flaws():
    catalog_pairs, rows = real_rows_with_flaws()
    expected = [ref_scores(r["completion"], r["seen_titles"], r["groundtruth"], catalog_pairs) for r in rows]
    catalog = load_catalog(CATALOG)
    examples = load_examples(SAMPLE)
    assert [e.seen_titles for e in examples] == [r["seen_titles"] for r in rows]
    agg, per_row = score_examples(examples, [r["completion"] for r in rows], catalog)
    assert_rows_equal(per_row, expected, [r["id"] for r in rows])
    # the flaws matter: the lenient view scores these lists higher
    lenient, _ = score_examples(examples, [r["completion"] for r in rows], catalog, protocol="lenient")
    assert lenient["ndcg@20"]["mean"] > agg["ndcg@20"]["mean"] > 0
    # and the clean demonstrations score the same under both (no flaw to forgive)
    clean = [e.completion for e in examples]
    a, _ = score_examples(examples, clean, catalog)
    b, _ = score_examples(examples, clean, catalog, protocol="lenient")
    assert a["ndcg@20"]["mean"] == pytest.approx(b["ndcg@20"]["mean"])


# ============================================================================ hand-derived cases

L2 = [1 / math.log2(i + 2) for i in range(30)]  # 1, 0.6309, 0.5, 0.4307, ...
FILMS = Catalog([CatalogItem(f"F{i}", 2000 + i) for i in range(1, 10)]
                + [CatalogItem("Heat", 1995), CatalogItem("Alien", 1979), CatalogItem("Dune", 1984),
                   CatalogItem("Dune", 1985), CatalogItem("Dune", 1987), CatalogItem("Dune", 1988)])


def score(text, gt, seen=(), protocol="paper"):
    return score_completion(parse_recommendations(text), gt, list(seen), FILMS, protocol=protocol)


def test_more_ground_truths_than_k():
    # 7 ground truths F1..F7; the list F1..F5, F8, F6, F9 -> hits [1, 1, 1, 1, 1, 0, 1, 0]
    gt = [(f"F{i}", 2000 + i) for i in range(1, 8)]
    text = "\n".join(f"F{i} ({2000 + i})" for i in (1, 2, 3, 4, 5, 8, 6, 9))
    for protocol in ("paper", "lenient"):
        row = score(text, gt, protocol=protocol)
        assert row["recall@5"] == pytest.approx(5 / 7)   # not 5 / min(7, 5) = 1
        assert row["recall@10"] == pytest.approx(6 / 7)
        assert row["ndcg@5"] == pytest.approx(1.0)       # IDCG@5 has 5 slots, not 7
        # NDCG@10: DCG = L2[0..4] + L2[6]; IDCG over min(7, 8 kept, 10) = 7 slots
        assert row["ndcg@10"] == pytest.approx((sum(L2[:5]) + L2[6]) / sum(L2[:7]))
        assert row["ndcg@10"] == pytest.approx(0.9021, abs=1e-4)  # 3.2818 / 3.6380


def test_the_authors_idcg_is_capped_by_the_filtered_list():
    # 4 ground truths, 2 items survive, the second is a hit; k = 5
    gt = [("F1", 2001), ("F2", 2002), ("F3", 2003), ("F4", 2004)]
    text = "Nope (2001)\nF8 (2008)\nF2 (2002)"
    assert score(text, gt)["ndcg@5"] == pytest.approx(L2[1] / (1 + L2[1]))        # 0.3869
    assert score(text, gt, protocol="lenient")["ndcg@5"] == pytest.approx(L2[1] / sum(L2[:4]))  # 0.2463
    assert ndcg_at_k([0, 1], 4, 5, ideal="official") == pytest.approx(0.3868528)


def test_duplicates_on_both_sides():
    text = "Heat (1995)\nHeat (1995)\nAlien (1979)"
    gt = [("Heat", 1995), ("Heat", 1995), ("Alien", 1979)]
    # the authors: both Heat ground truths mark the first Heat -> hits [1, 0, 1]
    assert hits(parse_recommendations(text), gt, [], FILMS).tolist() == [1, 0, 1]
    row = score(text, gt)
    assert row["recall@5"] == pytest.approx(2 / 3)
    assert row["ndcg@5"] == pytest.approx((1 + L2[2]) / sum(L2[:3]))
    # lenient: each copy consumes one ground truth -> [1, 1, 1]
    assert hits(parse_recommendations(text), gt, [], FILMS, protocol="lenient").tolist() == [1, 1, 1]
    assert score(text, gt, protocol="lenient")["recall@5"] == pytest.approx(1.0)
    # one ground truth, the film twice: one hit either way, the copy stays in the list as a miss
    for protocol in ("paper", "lenient"):
        assert hits(parse_recommendations(text), [("Heat", 1995)], [], FILMS,
                    protocol=protocol).tolist() == [1, 0, 0]


def test_year_tie_break():
    gt = [("Dune", 1984), ("Dune", 1986)]
    recs = [("Dune", 1985), ("Dune", 1987)]
    for protocol in ("paper", "lenient"):
        assert hits(recs, gt, [], FILMS, protocol=protocol).tolist() == [1, 0]
    # the exact year first (lenient): Dune 1985 takes its own year, so Dune 1988 reaches 1986
    gt = [("Dune", 1985), ("Dune", 1986)]
    recs = [("Dune", 1985), ("Dune", 1988)]
    assert hits(recs, gt, [], FILMS, protocol="lenient").tolist() == [1, 1]
    # the authors' loop has no year preference: both ground truths mark the first Dune
    assert hits(recs, gt, [], FILMS).tolist() == [1, 0]
    assert hits([("Dune", 1985), ("Dune", 1984)], [("Dune", 1984)], [], FILMS).tolist() == [1, 0]


def test_exact_strings_in_the_paper_protocol():
    gt = [("Heat", 1995)]
    assert hits([("heat", 1995)], gt, [], FILMS).tolist() == []                # not a catalog row
    assert hits([("heat", 1995)], gt, [], FILMS, protocol="lenient").tolist() == [1]
    assert hits([("Heat", 1996)], gt, [], FILMS).tolist() == []                # catalog: exact year
    assert hits([("Heat", 1996)], gt, [], FILMS, protocol="lenient").tolist() == [1]
    assert hits([("Heat", 1995)], gt, ["heat"], FILMS).tolist() == [1]         # seen: exact string
    assert hits([("Heat", 1995)], gt, ["heat"], FILMS, protocol="lenient").tolist() == []


def test_empty_lists_score_zero():
    for text in ("", "Sorry, I cannot help with that.", "Heat (1995)"):
        row = score(text, [("Alien", 1979)], seen=["Heat"])
        assert all(row[f"recall@{k}"] == 0 and row[f"ndcg@{k}"] == 0 for k in KS)
    assert score("", [("Alien", 1979)])["in_catalog"] == 0.0


def test_in_catalog_ratio_reads_the_first_20_parsed_items():
    # a preamble, blank lines and a line without a year take no slot; 25 parsed items follow
    text = "Intro:\n\nAlien\n\n" + "\n".join(["alien (1981)"] * 19 + ["Nope (2000)"] + ["Heat (1995)"] * 5)
    items = parse_recommendations(text)
    assert in_catalog_ratio(items, FILMS) == pytest.approx(19 / 20)            # lower-case, 2 years off
    assert in_catalog_ratio(items, FILMS, protocol="lenient") == 1.0  # 16 parsed among the first 20 lines


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-fixture"]:
        write_fixture()
        print(f"wrote {FIXTURE}")


# ============================================================================ the script


def run_evaluate(*args):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(root / "evaluate.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_evaluate_script_defaults_to_the_paper_protocol(tmp_path):
    data = json.loads(FIXTURE.read_text())
    rows = data["rows"]
    (tmp_path / "catalog.jsonl").write_text(
        "".join(json.dumps({"title": t, "year": y}, ensure_ascii=False) + "\n" for t, y in data["catalog"]))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(
        {"id": r["id"], "prompt": "p", "seen_titles": r["seen_titles"],
         "groundtruth_with_release_year": r["groundtruth"], "completion": r["completion"]}, ensure_ascii=False)
        + "\n" for r in rows))
    common = ["--data", tmp_path / "data.jsonl", "--catalog", tmp_path / "catalog.jsonl",
              "--predictions-from-field", "completion"]
    means = {}
    for protocol in ("", "paper", "lenient"):
        out = tmp_path / (protocol or "default")
        res = run_evaluate(*common, "--out", out, *(["--protocol", protocol] if protocol else []))
        assert res.returncode == 0, res.stderr
        assert f"protocol={protocol or 'paper'}" in res.stdout
        means[protocol] = json.loads((out / "results.json").read_text())["results"]["ndcg@20"]["mean"]
    expected = sum(r["expected"]["ndcg@20"] for r in rows) / len(rows)
    assert means[""] == means["paper"] == pytest.approx(expected, abs=1e-12)
    assert means["lenient"] != pytest.approx(means["paper"], abs=1e-3)  # the option changes the scoring
    bad = run_evaluate(*common, "--stop-after-items", 20)
    assert bad.returncode != 0 and "--stop-after-items" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
