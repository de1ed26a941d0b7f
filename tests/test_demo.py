"""persrm demo (zero-shot judging of the shipped demo pairs) runs through persrm eval's model judge."""

import json

from openrlhf_persrm.demo import DemoConfig, demo_pairs_path, run_demo


def test_demo_judges_the_shipped_pairs_and_reports(tmp_path, tiny_judge, capsys):
    summary = run_demo(DemoConfig(model=tiny_judge, limit=3, max_new_tokens=16, max_prompt_tokens=4096,
                                  out=str(tmp_path)))
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(rows) == 3
    assert {r["id"] for r in rows} <= {json.loads(line)["id"] for line in open(demo_pairs_path())}
    assert "accuracy (strict format, failures count as wrong)" in out and "format-failure rate" in out
    for r in rows:
        assert r["id"][:22] in out
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["format_failure_rate"] <= 1.0
