"""persrm eval --judge model, end to end: a tiny random local model, and an OpenAI-compatible endpoint."""

from __future__ import annotations

import json

from _openai_server import FakeOpenAIServer
from conftest import make_pair, write_rows

from openrlhf_persrm.eval.cli import main


def short_pairs(n: int = 4) -> list[dict]:
    # Short texts: the tiny model has 1024 positions and a byte-level 384-token vocabulary.
    return [make_pair(i, exemplars=["I like hiking and cooking on rainy weekends."],
                      prompt="Weekend plans?", chosen=f"Hiking, then soup {i}.", rejected=f"Shopping at the mall {i}.",
                      negative_type="cross_author" if i % 2 else "minor_replacement")
            for i in range(n)]


def test_model_judge_end_to_end_with_tiny_model(tiny_model, tmp_path, capsys):
    pairs = write_rows(tmp_path / "pairs.jsonl", short_pairs(4))
    out = tmp_path / "run"
    rc = main(["--pairs", str(pairs), "--judge", "model", "--model", tiny_model, "--out", str(out),
               "--max_prompt_tokens", "960", "--max_new_tokens", "12", "--batch_size", "4", "--bootstrap", "200"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "judging (model)" in captured.err  # the tqdm progress bar
    m = json.loads((out / "metrics.json").read_text())
    assert m["overall"]["n"] == 4 and m["overall"]["n_judgments"] == 4
    # A random 12-token model never writes <think>...</think><answer>[a, b]</answer>: all failures, all wrong.
    assert m["format_failure_rate"] == 1.0 and m["overall"]["accuracy"] == 0.0
    assert sum(m["failure_kinds"].values()) == 4 and "prompt_too_long" not in m["failure_kinds"]
    assert m["judge"]["name"] == "model" and m["judge"]["backend"] == "local"
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in rows] == ["failure"] * 4 and all(isinstance(r["output"], str) for r in rows)
    assert (out / "accuracy_by_type.png").stat().st_size > 0


def test_model_judge_through_an_openai_compatible_endpoint(tmp_path):
    pairs = write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(12)])
    out = tmp_path / "run"
    with FakeOpenAIServer(bad_content_rate=0.3) as srv:
        rc = main(["--pairs", str(pairs), "--judge", "model", "--endpoint", srv.base_url, "--out", str(out),
                   "--both-orders", "--bootstrap", "200"])
        served = srv.stats["judge"]
    assert rc == 0 and served == 24
    m = json.loads((out / "metrics.json").read_text())
    assert m["judge"]["model"] == "fake-teacher" and m["judge"]["backend"] == "endpoint"
    assert m["label"] == "model:fake-teacher"
    assert m["overall"]["n_judgments"] == 24
    v = m["overall"]["verdicts"]
    assert v["failure"] == sum(m["failure_kinds"].values()) > 0  # the fake server writes some malformed answers
    assert m["format_failure_rate"] == v["failure"] / 24
    assert m["overall"]["accuracy"] == v["correct"] / 24
    assert 0.0 <= m["consistency"]["rate"] <= 1.0


def test_endpoint_that_refuses_every_request_stops_the_run(tmp_path, capsys):
    pairs = write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(2)])
    with FakeOpenAIServer() as srv:
        rc = main(["--pairs", str(pairs), "--judge", "model", "--endpoint", srv.base_url, "--model", "no-such-model",
                   "--out", str(tmp_path / "run")])
    assert rc == 1 and "served none of 2 requests" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()
