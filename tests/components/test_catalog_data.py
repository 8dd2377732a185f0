"""Catalog and example loading: formats, normalisation, tolerance, and every kind of bad input."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rankgrpo.catalog import CatalogError, load_catalog, normalize_title, year_offsets
from rankgrpo.data import DataError, build_prompt, load_examples

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_normalize_title_is_the_one_rule():
    assert normalize_title("  Amélie\t ") == normalize_title("AME\u0301LIE")  # NFKC + casefold + spaces
    assert normalize_title("ＨＥＡＴ") == "heat"  # full-width letters fold under NFKC
    assert year_offsets(2) == [0, 1, -1, 2, -2] and year_offsets(0) == [0]


def test_jsonl_catalog_lookup_and_report(tmp_path):
    rows = [{"title": "Heat", "year": 1995, "genres": ["crime"]}, {"title": "Heat", "year": 1986},
            {"title": "The Wall", "year": 201}, {"title": "Heat", "year": "1995"}, {"year": 2000},
            {"title": "Odd", "year": "19xx"}]
    path = write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    cat = load_catalog(path)
    assert [str(i) for i in cat] == ["Heat (1995)", "Heat (1986)"]
    assert cat[0].meta == {"genres": ["crime"]}
    assert cat.report.dropped == {"impossible year": 1, "duplicate": 1, "missing title": 1,
                                  "non-integer year": 1, "malformed JSON": 1}
    assert "c.jsonl:3" in cat.report.examples["impossible year"][0]
    assert cat.lookup("heat", 1995) == 0 and cat.lookup("HEAT", 1987) == 1  # 1986 within +-1
    assert cat.lookup("Heat", 1997) == 0 and cat.lookup("Heat", 1998) is None
    assert cat.lookup("Heat", 1997, tolerance=0) is None and cat.lookup("Heat", None) is None
    assert cat.lookup("Heat", 1990, tolerance=5) == 1  # exact, +1, -1, ... : 1986 is 4 away, 1995 is 5


def test_tsv_catalog(tmp_path):
    cat = load_catalog(write(tmp_path / "c.tsv", "title\tyear\tdirector\nHeat\t1995\tMann\nAlien\t1979\tScott\n"))
    assert len(cat) == 2 and cat[1].meta["director"] == "Scott"
    with pytest.raises(CatalogError, match="header"):
        load_catalog(write(tmp_path / "bad.tsv", "Heat\t1995\n"))


def test_pickle_catalog_restricted(tmp_path):
    path = tmp_path / "c.pkl"
    path.write_bytes(pickle.dumps([("Heat", 1995), ("The Wall", 201), ("Alien", 1979)]))
    cat = load_catalog(path)
    assert len(cat) == 2 and cat.report.dropped["impossible year"] == 1

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([("Heat", 1995), Evil()]))
    with pytest.raises(CatalogError, match="refusing to unpickle"):
        load_catalog(bad)
    assert not (tmp_path / "pwned").exists()  # nothing executed

    from collections import OrderedDict
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(CatalogError, match="refusing"):
        load_catalog(other)


def test_empty_and_missing_catalog(tmp_path):
    with pytest.raises(CatalogError, match="empty"):
        load_catalog(write(tmp_path / "e.jsonl", ""))
    with pytest.raises(CatalogError, match="empty"):
        load_catalog(write(tmp_path / "e2.jsonl", json.dumps({"title": "X", "year": 3}) + "\n"))
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "nope.jsonl")


GOOD = {"prompt": [{"role": "user", "content": build_prompt("USER: hi\n")}], "seen_titles": ["Ran"],
        "groundtruth_with_release_year": [["Heat", "1995"], ["Alien", 1979]]}


def test_examples_three_container_formats(tmp_path):
    jl = load_examples(write(tmp_path / "a.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "x"})))
    assert [e.id for e in jl] == ["0", "x"] and jl[0].groundtruth == [("Heat", 1995), ("Alien", 1979)]
    assert jl[0].conversation == "USER: hi\n"
    lst = load_examples(write(tmp_path / "b.json", json.dumps([GOOD, GOOD])))
    obj = load_examples(write(tmp_path / "c.json", json.dumps({"samples": [GOOD]})))
    assert len(lst) == 2 and len(obj) == 1
    s = load_examples(write(tmp_path / "d.jsonl", json.dumps({**GOOD, "prompt": "plain text"})))
    assert s[0].messages == [{"role": "user", "content": "plain text"}]


@pytest.mark.parametrize("record,message", [
    ({k: v for k, v in GOOD.items() if k != "prompt"}, r"d\.jsonl:2: missing field 'prompt'"),
    ({k: v for k, v in GOOD.items() if k != "groundtruth_with_release_year"},
     r"d\.jsonl:2: missing field 'groundtruth_with_release_year'"),
    ({**GOOD, "groundtruth_with_release_year": [["Heat", "19xx"]]},
     r"d\.jsonl:2: field 'groundtruth_with_release_year\[0\]' has a year that is not an integer: '19xx'"),
    ({**GOOD, "groundtruth_with_release_year": "Heat (1995)"},
     r"d\.jsonl:2: field 'groundtruth_with_release_year' must be a list"),
    ({**GOOD, "seen_titles": "Ran"}, r"d\.jsonl:2: field 'seen_titles' must be a list"),
    ({**GOOD, "prompt": []}, r"d\.jsonl:2: field 'prompt' must be"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write(tmp_path / "d.jsonl", json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_malformed_json_line(tmp_path):
    path = write(tmp_path / "m.jsonl", json.dumps(GOOD) + "\n" + '{"prompt": "x", \n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: malformed JSON"):
        load_examples(path)


def test_prompt_is_the_papers_text():
    p = build_prompt("USER: Best heist films?\n")
    assert p == (
        "Pretend you are a movie recommender system.\n"
        "I will give you a conversation between a user and you (a recommender system). Based on the "
        "conversation, you need to reply with 20 recommendations. List the standardized English title of each "
        "movie in each line in the form of \"movie name\" (release_year) with NO extra words or sentences.\n"
        "Here is the conversation: USER: Best heist films?\n")


def test_evaluate_cli_scores_a_predictions_file(tmp_path):
    cat = write(tmp_path / "cat.jsonl", '{"title": "Heat", "year": 1995}\n{"title": "Alien", "year": 1979}\n')
    data = write(tmp_path / "ex.jsonl", json.dumps({**GOOD, "id": "a"}) + "\n" + json.dumps({**GOOD, "id": "b"}))
    preds = write(tmp_path / "p.jsonl", json.dumps({"id": "b", "completion": "Alien (1979)"}) + "\n"
                  + json.dumps({"id": "a", "completion": "Heat (1995)\nAlien (1979)"}) + "\n")
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--data", str(data), "--catalog", str(cat),
                          "--predictions", str(preds), "--json", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "R@5" in res.stdout and "N@20" in res.stdout
    r = json.loads(out.read_text())["results"]
    assert r["recall@5"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    # the paper's IDCG for "b" is capped by its one-item list: NDCG 1; the textbook one has 2 slots
    assert r["ndcg@5"]["mean"] == pytest.approx((1.0 + 1.0) / 2)
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--data", str(data), "--catalog", str(cat),
                          "--predictions", str(preds), "--json", str(out), "--protocol", "lenient"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = json.loads(out.read_text())["results"]
    assert r["ndcg@5"]["mean"] == pytest.approx((1.0 + 1 / 1.6309297535714575) / 2)
    bad = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--data", str(data), "--catalog",
                          str(tmp_path / "missing.jsonl"), "--predictions", str(preds)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--catalog" in bad.stderr and "missing.jsonl: no such file" in bad.stderr
