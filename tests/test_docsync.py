"""The README's result blocks are copies of generated reports, never typed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from openrlhf_persrm.docsync import main, section, sync

ROOT = Path(__file__).resolve().parents[1]


def _files(tmp_path, readme_block: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "report.md").write_text(
        "# run\n\n## Judges\n\n| judge | acc |\n|---|---|\n| x | 91.0 |\n\n![c](report_compare.png)\n\n"
        "### Detail\nkept\n\n## Other\nnot copied\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- generated from docs/report.md#judges -->\n" + readme_block
                      + "<!-- end generated -->\nafter\n", encoding="utf-8")
    return readme


def test_a_block_is_refreshed_from_its_source_section_with_links_rewritten(tmp_path):
    readme = _files(tmp_path, "| judge | acc |\n| x | 50.0 |\n")
    assert main([str(readme), "--check"]) == 1
    assert main([str(readme)]) == 0
    text = readme.read_text()
    assert "| x | 91.0 |" in text and "50.0" not in text
    assert "![c](docs/report_compare.png)" in text  # valid from the README's folder
    assert "### Detail\nkept" in text and "not copied" not in text
    assert text.startswith("intro\n") and text.endswith("<!-- end generated -->\nafter\n")
    assert main([str(readme), "--check"]) == 0


def test_a_missing_section_or_end_marker_is_an_error_with_its_line(tmp_path, capsys):
    readme = _files(tmp_path, "")
    readme.write_text(readme.read_text().replace("#judges", "#nothing"))
    assert main([str(readme)]) == 2
    assert "README.md:2: docs/report.md#nothing: the source has no such section" in capsys.readouterr().err
    readme.write_text("<!-- generated from docs/report.md#judges -->\nno end\n")
    with pytest.raises(ValueError, match="without"):
        sync(readme)


def test_section_stops_at_a_heading_of_its_level():
    assert section("## A\none\n### Sub\ntwo\n## B\nthree\n", "a") == ["one", "### Sub", "two"]
    assert section("## A\none\n### Sub\ntwo\n## B\nthree\n", "sub") == ["two"]
    assert section("## Judges (test)\n\nx\n", "judges-test") == ["x"]


def test_the_readme_is_in_sync_with_the_reports():
    _, changed = sync(ROOT / "README.md")
    assert not changed, f"stale README blocks {changed}: run `python -m openrlhf_persrm.docsync README.md`"
