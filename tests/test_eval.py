"""persrm eval: metrics (pure), baseline judges, config validation, outputs and the CLI."""

from __future__ import annotations

import json
import math
import pickle

import pytest
from conftest import make_pair, write_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_persrm.eval.cli import main, make_parser
from openrlhf_persrm.eval.config import EvalConfig
from openrlhf_persrm.eval.judges import (JudgeFailure, LengthJudge, ModelJudge, PairwiseJudge, RandomJudge,
                                         StylometryJudge, normalized_length)
from openrlhf_persrm.eval.metrics import Judged, bootstrap_ci, compute_metrics, consistency
from openrlhf_persrm.eval.report import compare
from openrlhf_persrm.eval.run import run_eval
from openrlhf_persrm.pairs import PairFormatError, PairRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OracleJudge(PairwiseJudge):
    """Always gives the real text the higher score."""

    name = "oracle"

    def score(self, record, position):
        return (9, 1) if position == "A" else (1, 9)


class AlwaysAJudge(PairwiseJudge):
    name = "always_a"

    def score(self, record, position):
        return (9, 1)


def mixed_rows(n: int = 8) -> list[dict]:
    types = ["minor_replacement", "cross_author"]
    return [make_pair(i, negative_type=types[(i // 2) % 2]) for i in range(n)]


@pytest.fixture
def mixed_file(tmp_path):
    return write_rows(tmp_path / "pairs.jsonl", mixed_rows())


def cfg_for(path, out, **kw) -> EvalConfig:
    kw.setdefault("judge", "random")
    kw.setdefault("bootstrap", 200)
    return EvalConfig(pairs=str(path), out=str(out), **kw)


# --------------------------------------------------------------------------- accuracy

def test_oracle_judge_scores_one(mixed_file, tmp_path):
    m = run_eval(cfg_for(mixed_file, tmp_path / "o"), judge=OracleJudge(), echo=False)
    assert m["overall"]["accuracy"] == 1.0
    assert m["overall"]["ci95"] == [1.0, 1.0]
    assert all(g["accuracy"] == 1.0 for g in m["by_type"].values())
    assert all(g["accuracy"] == 1.0 for g in m["by_author"].values())


def test_always_a_is_chance_on_balanced_positions(mixed_file, tmp_path):
    m = run_eval(cfg_for(mixed_file, tmp_path / "a"), judge=AlwaysAJudge(), echo=False)
    assert m["overall"]["accuracy"] == 0.5
    assert m["consistency"] is None  # one order only: consistency is not defined


def test_always_a_both_orders_has_zero_consistency(mixed_file, tmp_path):
    m = run_eval(cfg_for(mixed_file, tmp_path / "b", both_orders=True), judge=AlwaysAJudge(), echo=False)
    assert m["overall"]["accuracy"] == 0.5
    assert m["overall"]["n"] == 8 and m["overall"]["n_judgments"] == 16
    assert m["consistency"]["rate"] == 0.0
    assert m["overall"]["consistency"] == 0.0
    # Every pair is right once and wrong once: each bootstrap resample has accuracy 0.5.
    assert m["overall"]["ci95"] == [0.5, 0.5]


def J(pid, real_at, scores, failure=None, t="minor_replacement"):
    return Judged(pid, "x", t, real_at, scores, failure)


def test_consistency_on_a_hand_made_table():
    table = [
        J("p1", "A", (8, 2)), J("p1", "B", (2, 8)),        # real both times: consistent, correct
        J("p2", "A", (2, 8)), J("p2", "B", (8, 2)),        # negative both times: consistent, wrong
        J("p3", "A", (8, 2)), J("p3", "B", (8, 2)),        # always A: inconsistent
        J("p4", "A", (5, 5)), J("p4", "B", (5, 5)),        # ties: no verdict, inconsistent
        J("p5", "A", (8, 2)), J("p5", "B", None, "no_answer"),  # a failure: inconsistent
        J("p6", "A", (9, 1)),                               # one order only: not counted
    ]
    c = consistency({pid: [j for j in table if j.pair_id == pid] for pid in {j.pair_id for j in table}})
    assert c == {"rate": 2 / 5, "n": 5, "consistent_pairs": 2, "correct_in_both_orders": 1 / 5}
    m = compute_metrics(table, n_resamples=200)
    assert m["consistency"]["rate"] == 2 / 5
    # correct: p1 x2, p3 A, p5 A, p6 A = 5 of 11 judgments; ties 2, failure 1.
    assert m["overall"]["accuracy"] == 5 / 11
    assert m["overall"]["verdicts"] == {"correct": 5, "wrong": 3, "tie": 2, "failure": 1}
    assert m["format_failure_rate"] == 1 / 11
    assert m["failure_kinds"] == {"no_answer": 1}


def test_failures_count_as_wrong():
    table = [J("p1", "A", (9, 1)), J("p2", "B", None, "malformed"), J("p3", "A", None, "no_answer"),
             J("p4", "B", (1, 9))]
    m = compute_metrics(table, n_resamples=200)
    assert m["overall"]["accuracy"] == 0.5
    assert m["format_failure_rate"] == 0.5


def test_judged_rejects_nonsense():
    with pytest.raises(ValueError):
        Judged("p", "a", "t", "C", (1, 2))
    with pytest.raises(ValueError):
        Judged("p", "a", "t", "A", None)


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_is_deterministic_by_seed_and_contains_estimate():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0.5, 0, 1]
    mean = sum(values) / len(values)
    a = bootstrap_ci(values, seed=3, n_resamples=500)
    assert a == bootstrap_ci(values, seed=3, n_resamples=500)
    assert a != bootstrap_ci(values, seed=4, n_resamples=500)
    assert a[0] <= mean <= a[1] and a[0] < a[1]
    assert all(math.isnan(x) for x in bootstrap_ci([]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=60), st.integers(0, 2**31))
def test_bootstrap_interval_contains_point_estimate(values, seed):
    lo, hi = bootstrap_ci(values, seed=seed, n_resamples=300)
    mean = sum(values) / len(values)
    assert 0.0 <= lo <= mean + 1e-12 and mean - 1e-12 <= hi <= 1.0


def test_metrics_are_deterministic_by_seed(mixed_file, tmp_path):
    a = run_eval(cfg_for(mixed_file, tmp_path / "1", seed=7), echo=False)
    b = run_eval(cfg_for(mixed_file, tmp_path / "2", seed=7), echo=False)
    assert a["overall"] == b["overall"] and a["by_type"] == b["by_type"]


# --------------------------------------------------------------------------- baselines

def rec(**kw) -> PairRecord:
    return PairRecord.from_json(make_pair(0, **kw))


def test_stylometry_prefers_the_text_like_the_exemplars():
    r = rec(exemplars=["Verily, thou art a knave; forsooth, thy tongue doth wag too freely, sirrah."],
            chosen="Forsooth, sirrah, thou art verily a most tedious knave, and thy tongue doth wag.",
            rejected="OK so basically the meeting got moved to 3pm lol, can u ping the team?")
    for weighting in ("tf", "tfidf"):
        j = StylometryJudge(weighting=weighting)
        out = j.judge([r, r], ["A", "B"])
        assert out[0][0] > out[0][1] and out[1][1] > out[1][0]


@given(st.sampled_from([LengthJudge(), StylometryJudge(), StylometryJudge(weighting="tf", ngram=2)]))
def test_symmetric_baselines_swap_scores_with_positions(judge):
    r = rec()
    a, b = judge.judge([r, r], ["A", "B"])
    assert a == (b[1], b[0])


def test_length_rule_is_closest_to_mean_exemplar_length():
    r = rec(exemplars=["x" * 10, "y" * 30], chosen="c" * 21, rejected="r" * 40)  # mean 20
    assert normalized_length("  a \n\n b ") == 3
    assert LengthJudge().score(r, "A") == (-1.0, -20.0)


def test_random_judge_is_seeded_and_roughly_fair():
    recs = [PairRecord.from_json(make_pair(i)) for i in range(200)]
    one = RandomJudge(seed=1).judge(recs, ["A"] * 200)
    assert one == RandomJudge(seed=1).judge(recs, ["A"] * 200)
    assert one != RandomJudge(seed=2).judge(recs, ["A"] * 200)
    assert 70 < sum(s == (1.0, 0.0) for s in one) < 130
    assert pickle.loads(pickle.dumps(RandomJudge(seed=1))) == RandomJudge(seed=1)


class CannedBackend:
    def __init__(self, texts):
        self.texts = list(texts)

    def generate(self, requests, progress=None):
        return [self.texts.pop(0) for _ in requests]


def test_model_judge_reads_outputs_strictly():
    recs = [PairRecord.from_json(make_pair(i)) for i in range(4)]
    texts = ["<think>plain</think><answer>[8, 3]</answer>", "<answer>[8, 3]</answer>", None,
             "<think>x</think><answer>[3]</answer>"]
    out = ModelJudge(CannedBackend(texts), label="canned").judge(recs, ["A", "B", "A", "B"])
    assert out[0] == (8.0, 3.0)
    assert [o.kind for o in out[1:]] == ["no_reasoning", "request_error", "malformed"]


def test_model_judge_that_serves_nothing_stops():
    from openrlhf_persrm.contracts import JudgeError

    recs = [PairRecord.from_json(make_pair(i)) for i in range(2)]
    with pytest.raises(RuntimeError, match="served none of 2 requests; first error: HTTP 401"):
        ModelJudge(CannedBackend([JudgeError("HTTP 401"), JudgeError("HTTP 401")]), label="x").judge(recs, ["A", "B"])


def test_model_judge_prompt_too_long_is_a_failure():
    recs = [PairRecord.from_json(make_pair(0))]
    out = ModelJudge(CannedBackend([]), label="x", count_tokens=lambda m: 10_000,
                     max_prompt_tokens=300).judge(recs, ["A"])
    assert isinstance(out[0], JudgeFailure) and out[0].kind == "prompt_too_long"


# --------------------------------------------------------------------------- config and CLI

@pytest.mark.parametrize("kw, needle", [
    ({"judge": "model"}, "--judge model needs --model"),
    ({"judge": "psychic"}, "--judge 'psychic'"),
    ({"judge": "length", "model": "x"}, "--model 'x' is only used by --judge model"),
    ({"judge": "model", "endpoint": "localhost:8000"}, "--endpoint 'localhost:8000'"),
    ({"judge": "random", "bootstrap": 10}, "--bootstrap 10"),
    ({"judge": "random", "limit": -1}, "--limit -1"),
    ({"judge": "stylometry", "weighting": "bm25"}, "--weighting 'bm25'"),
])
def test_config_errors_name_flag_and_fix(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        EvalConfig(pairs="p.jsonl", out="o", **kw)


def test_cli_model_without_checkpoint_exits_2(pairs_file, tmp_path, capsys):
    assert main(["--pairs", str(pairs_file), "--judge", "model", "--out", str(tmp_path)]) == 2
    assert "--judge model needs --model" in capsys.readouterr().err


def test_parser_accepts_both_spellings():
    a = make_parser().parse_args(["--pairs", "p", "--judge", "random", "--out", "o", "--both-orders",
                                  "--max-new-tokens", "7"])
    assert a.both_orders and a.max_new_tokens == 7
    assert make_parser().parse_args(["--pairs", "p", "--judge", "random", "--both_orders"]).both_orders


def test_bad_row_reports_file_and_line(tmp_path, capsys):
    rows = [make_pair(0), make_pair(1)]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({**rows[1], "exemplars": []}) + "\n")
    with pytest.raises(PairFormatError) as err:
        run_eval(cfg_for(path, tmp_path / "o"), echo=False)
    assert err.value.path == str(path) and err.value.line == 3
    assert main(["--pairs", str(path), "--judge", "length", "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:3:" in capsys.readouterr().err
    # --skip_invalid goes on, and records the skip.
    m = run_eval(cfg_for(path, tmp_path / "o", skip_invalid=True), echo=False)
    assert m["data"]["rows_skipped"] == 1 and m["overall"]["n"] == 1


def test_split_filter_and_unknown_split(tmp_path):
    rows = [make_pair(i, split="test_unseen_authors" if i < 4 else "train") for i in range(10)]
    path = write_rows(tmp_path / "p.jsonl", rows)
    m = run_eval(cfg_for(path, tmp_path / "o", split="test_unseen_authors"), echo=False)
    assert m["overall"]["n"] == 4 and m["data"]["split"] == "test_unseen_authors"
    with pytest.raises(ValueError, match="splits present: test_unseen_authors, train"):
        run_eval(cfg_for(path, tmp_path / "o", split="dev"), echo=False)


def test_outputs_have_documented_keys_and_a_valid_png(mixed_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--pairs", str(mixed_file), "--judge", "stylometry", "--both-orders", "--out", str(out),
                 "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "| **overall** |" in printed and "type: cross_author" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert {"overall", "by_type", "by_author", "consistency", "format_failure_rate", "judge", "config",
            "label", "data", "bootstrap", "failure_kinds"} <= m.keys()
    assert {"accuracy", "ci95", "n"} <= m["overall"].keys() and len(m["overall"]["ci95"]) == 2
    assert set(m["by_type"]) == {"minor_replacement", "cross_author"}
    assert set(m["by_author"]) == {"jane_austen", "herman_melville"}
    assert m["judge"]["name"] == "stylometry" and m["config"]["judge"] == "stylometry"
    assert (out / "metrics.md").read_text().startswith("**stylometry**")
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 16
    png = (out / "accuracy_by_type.png").read_bytes()
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    from matplotlib.image import imread

    assert imread(str(out / "accuracy_by_type.png")).shape[0] > 100


def test_compare_puts_judges_side_by_side(mixed_file, tmp_path, capsys):
    paths = []
    for judge in ("stylometry", "random"):
        run_eval(cfg_for(mixed_file, tmp_path / judge, judge=judge), echo=False)
        paths.append(str(tmp_path / judge / "metrics.json"))
    md = compare(paths, str(tmp_path / "c" / "compare.png"), str(tmp_path / "c" / "compare.md"),
                 labels=["stylo", "coin"])
    assert "| stylo |" in md and "| coin |" in md and "minor_replacement" in md
    assert (tmp_path / "c" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["compare", *paths, "--out", str(tmp_path / "c2")]) == 0
    md2 = (tmp_path / "c2" / "compare.md").read_text()
    assert "| stylometry |" in md2 and "| random |" in md2  # labels stored in metrics.json


def test_limit_spreads_over_authors():
    from conftest import make_pair

    from openrlhf_persrm.eval.run import spread_over_authors
    from openrlhf_persrm.pairs import PairRecord

    recs = [PairRecord.from_json(make_pair(i, author="first" if i < 10 else "second")) for i in range(12)]
    picked = spread_over_authors(recs, 4, seed=0)
    assert sorted(r.author for r in picked) == ["first", "first", "second", "second"]
    assert [r.id for r in picked] == [r.id for r in spread_over_authors(recs, 4, seed=0)]  # deterministic


# --------------------------------------------------------------------------- rough edges (issue 12)

@pytest.mark.parametrize("second, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({**make_pair(1), "author": "Ren\u00e9"}, ensure_ascii=False).encode("latin-1"),
     "not UTF-8 text (byte 0xe9"),
])
def test_nested_or_non_utf8_row_names_file_and_line(tmp_path, capsys, second, words):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(make_pair(0)).encode() + b"\n" + second + b"\n" + json.dumps(make_pair(2)).encode())
    assert main(["--pairs", str(path), "--judge", "length", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: ") and words in err and "Traceback" not in err
    m = run_eval(cfg_for(path, tmp_path / "o", skip_invalid=True), echo=False)
    assert m["data"]["rows_skipped"] == 1 and m["overall"]["n"] == 2


def test_pairs_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["--pairs", str(tmp_path), "--judge", "length", "--out", str(tmp_path / "o")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_help_prints_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "95%" in out and "%%" not in out


class TieJudge(PairwiseJudge):
    name = "tie"

    def score(self, record, position):
        return (5, 5)


def test_compare_shows_ties(mixed_file, tmp_path):
    paths = []
    for name, judge in (("oracle", OracleJudge()), ("tie", TieJudge())):
        run_eval(cfg_for(mixed_file, tmp_path / name, label=name), judge=judge, echo=False)
        paths.append(str(tmp_path / name / "metrics.json"))
    md = compare(paths, str(tmp_path / "c" / "compare.png"), str(tmp_path / "c" / "compare.md"))
    head, _, *rows = md.splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    ties = cols.index("ties %")
    by_label = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")]
                for r in rows if r.startswith("| ")}
    assert by_label["oracle"][ties] == "0.0" and by_label["tie"][ties] == "100.0"
    assert by_label["tie"][1].startswith("0.0")  # accuracy 0: the ties column says why


def test_rerun_removes_temp_files_of_a_killed_write(mixed_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = [out / "metrics.json.tmp", out / ".judgments.jsonl.x1y2z3.tmp"]
    keep = out / "notes.tmp"
    for p in [*stale, keep]:
        p.write_text("partial")
    run_eval(cfg_for(mixed_file, out), echo=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert json.loads((out / "metrics.json").read_text())["overall"]["n"] == 8


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_compare_names_a_file_that_is_not_metrics(tmp_path, capsys, content):
    bad = tmp_path / "metrics.json"
    bad.write_bytes(content)
    assert main(["compare", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}: not a persrm eval metrics.json")
