"""Every figure of the benchmark report and of the README's results comes from a committed output
(scripts/check_report.py): a number with three or more decimals must be some committed number
rounded to its decimals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
check_report = load_script(ROOT / "scripts" / "check_report.py")


@pytest.mark.parametrize("doc, heading, outputs", check_report.CHECKS)
def test_every_committed_figure_has_a_source(doc, heading, outputs):
    missing = check_report.unsourced(ROOT / doc, heading, ROOT / outputs)
    assert not missing, f"{doc}: figures in no committed output under {outputs}: {missing[:10]}"


def test_an_invented_figure_is_caught(tmp_path):
    out = tmp_path / "outputs"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "summary.json").write_text(json.dumps({"a": {"mean": 0.42434, "d": [-0.01049, True]}}))
    (out / "table.md").write_text("| x | 0.3333 |\n")
    doc = tmp_path / "doc.md"
    doc.write_text("# T\n\nN@20 0.4243 and 0.424; the gain −0.0105 (+1.5 SE); 0.3333.\n\n## Results\n\n"
                   "invented 0.4244, and 1.000 (True is not a number).\n")
    assert check_report.unsourced(doc, None, out) == [(7, "0.4244"), (7, "1.000")]
    assert check_report.unsourced(doc, "## Results", out) == [(7, "0.4244"), (7, "1.000")]
    doc.write_text("# T\n\n## Results\n\nall sourced: 0.42, 0.4243, −0.010.\n\n## Next\n\n0.9999\n")
    assert check_report.unsourced(doc, "## Results", out) == []
    assert check_report.main([str(doc), "--outputs", str(out)]) == 1  # 0.9999 in the whole document


from rankgrpo import report_blocks  # noqa: E402


def test_the_reports_generated_tables_are_those_of_the_committed_outputs():
    report = ROOT / "benchmarks" / "results" / "REPORT.md"
    text = report.read_text(encoding="utf-8")
    assert report_blocks.BLOCK.search(text), "REPORT.md has no generated block"
    assert report_blocks.render(text, report.parent) == text, \
        "REPORT.md's generated blocks are stale: python -m rankgrpo.report_blocks benchmarks/results/REPORT.md"


def test_a_block_is_replaced_by_its_source_section_and_a_stale_one_is_caught(tmp_path):
    (tmp_path / "tables.md").write_text("# T\nintro\n## Table 1\n| a | 0.5000 |\n\n### note\nx\n## Table 2\n| b |\n")
    doc = ('prose 1\n<!-- generated from tables.md "## Table 1" -->\nold\n<!-- end generated -->\nprose 2\n'
           '<!-- generated from tables.md -->\n<!-- end generated -->\n')
    new = report_blocks.render(doc, tmp_path)
    assert new.startswith('prose 1\n<!-- generated from tables.md "## Table 1" -->\n| a | 0.5000 |\n\n### note\nx\n'
                          '<!-- end generated -->\nprose 2\n')
    assert "intro\n## Table 1" in new and report_blocks.render(new, tmp_path) == new
    (tmp_path / "REPORT.md").write_text(doc)
    assert report_blocks.main([str(tmp_path / "REPORT.md"), "--check"]) == 1
    assert report_blocks.main([str(tmp_path / "REPORT.md")]) == 0
    assert report_blocks.main([str(tmp_path / "REPORT.md"), "--check"]) == 0
    with pytest.raises(SystemExit, match="no heading"):
        report_blocks.render('<!-- generated from tables.md "## Table 9" -->\n<!-- end generated -->', tmp_path)
