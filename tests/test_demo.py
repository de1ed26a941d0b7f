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
    # the summary's figures are the judgments' own: accuracy = correct / all, failures / all
    verdicts = [r["verdict"] for r in rows]
    assert summary["accuracy"] == verdicts.count("correct") / 3
    assert summary["format_failure_rate"] == verdicts.count("failure") / 3
    assert f"accuracy (strict format, failures count as wrong): {summary['accuracy']:.2f}" in out
    for r in rows:  # each verdict follows from the scores it reports and where the real text was
        if r["scores"] is None:
            assert r["verdict"] == "failure" and r["failure"], r
        else:
            real, other = r["scores"] if r["real_at"] == "A" else r["scores"][::-1]
            assert r["verdict"] == ("correct" if real > other else "wrong" if real < other else "tie"), r
