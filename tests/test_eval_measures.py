"""persrm eval's judges that read measures, not generations: likelihood, fluency, reader, oracle (the
evidence module) and evidence (the bootstrap traces' procedure), on constructed pairs whose answer is known;
and an evidence-informed model judge reading the rows' evidence."""

from __future__ import annotations

import json

import pytest
from conftest import make_pair, write_rows

from openrlhf_persrm.eval.config import EvalConfig
from openrlhf_persrm.eval.judges import EvidenceJudge, MeasureJudge, ModelJudge, evidence_for
from openrlhf_persrm.eval.run import run_eval
from openrlhf_persrm.evidence import CandidateEvidence, PairEvidence
from openrlhf_persrm.pairs import PairRecord

WHALING = ("Queequeg, the harpooneer, sat cross-legged on the deck of the Pequod, sharpening his harpoon and "
           "humming a low song of his island.",
           "Captain Ahab stood upon the quarter-deck, his ivory leg braced in its socket, and gazed out at the grey "
           "whaling grounds where the white whale had last been seen.")
PERSON = ("Queequeg climbed to the masthead of the Pequod, and Captain Ahab, his ivory leg braced on the "
          "quarter-deck, watched the grey sea for the white whale.")
GENERIC = ("Our quarterly results exceeded expectations, and the marketing team will present the new product "
           "roadmap to stakeholders next Tuesday afternoon.")
REAL = "The old man walked slowly down to the harbour, where the fishing boats were coming in with the tide."
SWAP = "The old man strolled tardily down to the haven, where the fishing boats were arriving in with the tide."


@pytest.fixture(scope="module")
def known_pairs(tmp_path_factory):
    rows = [make_pair(0, id="person", author="melville", exemplars=list(WHALING), prompt="Write a paragraph.",
                      chosen=PERSON, rejected=GENERIC, negative_type="cross_author"),
            make_pair(1, id="swap", author="melville", exemplars=list(WHALING), prompt="The day began.",
                      chosen=REAL, rejected=SWAP, negative_type="minor_replacement")]
    return write_rows(tmp_path_factory.mktemp("known") / "pairs.jsonl", rows)


@pytest.mark.parametrize("judge, right", [("likelihood", {"person"}), ("fluency", {"swap"}),
                                          ("reader", {"person", "swap"}), ("oracle", {"person", "swap"})])
def test_measure_judges_on_pairs_whose_answer_is_known(known_pairs, tmp_path, judge, right):
    """SmolLM2's exemplar gain finds the person's paragraph (but is blind to a synonym swap of a text the
    exemplars never saw); fluency finds the swap; the reader and the per-type oracle find both."""
    kwargs = {"model": "smollm2-135m-instruct"} if judge in ("likelihood", "fluency") else \
        {"scorer": "smollm2-135m-instruct"}
    metrics = run_eval(EvalConfig(pairs=str(known_pairs), judge=judge, out=str(tmp_path), both_orders=True,
                                  bootstrap=100, **kwargs), echo=False)
    rows = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    correct = {r["id"] for r in rows if r["verdict"] == "correct"}
    assert right <= correct
    assert metrics["consistency"]["rate"] == 1.0  # measures are position-free


def test_evidence_judge_follows_the_bootstrap_procedure():
    """Shared content words and the person's visible habits decide: a candidate in the exemplars' words wins."""
    rec = PairRecord("e", "melville", list(WHALING), "Write.", PERSON, GENERIC, "cross_author")
    judge = EvidenceJudge()
    a, b = judge.score(rec, "A")
    assert a > b and judge.score(rec, "B") == (b, a)


def _ev(gain_real, gain_neg, alike=0.1, scorer="smollm2-135m-instruct"):
    return PairEvidence(CandidateEvidence(-3 + gain_real, -3.0, 0.5, 0.0, 0, 30),
                        CandidateEvidence(-3 + gain_neg, -3.0, 0.5, 0.0, 0, 30), alike, scorer).to_json()


def test_reader_and_oracle_read_the_rows_evidence_without_a_model(tmp_path):
    rows = [make_pair(i, negative_type="cross_author", evidence=_ev(0.3, 0.1) if i < 3 else _ev(0.1, 0.3))
            for i in range(4)]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    reader = run_eval(EvalConfig(pairs=str(path), judge="reader", out=str(tmp_path / "r"), bootstrap=100), echo=False)
    assert reader["overall"]["accuracy"] == pytest.approx(0.75)
    oracle = run_eval(EvalConfig(pairs=str(path), judge="oracle", out=str(tmp_path / "o"), bootstrap=100), echo=False)
    assert oracle["judge"]["best_measure_by_type"]["cross_author"] == "gain"


def test_missing_evidence_without_a_scorer_is_an_error_naming_the_fix(tmp_path):
    rec = PairRecord.from_json(make_pair(0))
    with pytest.raises(ValueError, match="--scorer"):
        evidence_for([rec])
    with pytest.raises(ValueError, match="choose one of"):
        MeasureJudge(kind="astrology")


class _EchoBackend:
    """Answers every judgment with the side its evidence block's exemplar gain favours."""

    def __init__(self):
        self.seen = []

    def generate(self, requests, progress=None):
        out = []
        for req in requests:
            user = req.messages[-1]["content"]
            self.seen.append(req.messages)
            side = "A" if "exemplar gain: A" in user and "-> favours A" in user.split("exemplar gain:")[1] \
                .split("\n")[0] else "B"
            out.append(f"<think>gain favours {side}</think><answer>{'[8, 3]' if side == 'A' else '[3, 8]'}</answer>")
            if progress is not None:
                progress.update(1)
        return out


def test_an_evidence_informed_model_judge_sees_the_evidence_in_both_orders_and_is_compared_with_gain(tmp_path):
    rows = [make_pair(i, negative_type="cross_author", evidence=_ev(0.3, 0.1) if i < 3 else _ev(0.1, 0.3))
            for i in range(4)]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    records = [PairRecord.from_json(r) for r in rows]
    backend = _EchoBackend()
    judge = ModelJudge(backend, label="echo", evidence=evidence_for(records))
    metrics = run_eval(EvalConfig(pairs=str(path), judge="model", model="echo", out=str(tmp_path / "m"),
                                  both_orders=True, bootstrap=100), judge=judge, echo=False)
    assert all('<evidence v="1">' in m[1]["content"] for m in backend.seen)
    assert metrics["overall"]["accuracy"] == pytest.approx(0.75) and metrics["consistency"]["rate"] == 1.0
    assert metrics["versus_gain"]["overall"].get("disagree", 0) == 0
    assert metrics["versus_gain"]["overall"]["agree"] == 8


def test_trace_agreement_counts_where_the_verdict_follows_the_reasoning(tmp_path):
    from openrlhf_persrm.eval.metrics import Judged, trace_agreement
    from openrlhf_persrm.judge_format import traced_side
    from openrlhf_persrm.report import trace_of

    def out(side: str, answer: str) -> str:
        return (f"<think>\nA and B are 9% alike: different texts, so exemplar gain decides. Exemplar gain favours "
                f"{side} clearly.\n</think>\n<answer>{answer}</answer>")

    assert traced_side(out("B", "[9, 2]")) == "B"
    assert traced_side("<think>\nA is copied from the exemplars, so B is the person's.\n</think>") == "B"
    assert traced_side("<think>\nno side</think><answer>[1, 2]</answer>") is None
    assert traced_side("<think>x</think><answer>favours A</answer>") is None  # only the reasoning counts
    rows = [  # (real_at, scores, output)
        ("A", (9.0, 2.0), out("A", "[9, 2]")),   # traced right, follows
        ("A", (2.0, 9.0), out("A", "[2, 9]")),   # traced right, does not follow
        ("B", (9.0, 2.0), out("A", "[9, 2]")),   # traced wrong, follows
        ("B", (5.0, 5.0), out("B", "[5, 5]")),   # a tie: not counted
        ("B", None, "<think>rambling"),           # no side, no verdict: not counted
    ]
    judged = [Judged(f"p{i}", "x", "cross_author", r, s, None if s else "no_answer") for i, (r, s, _) in enumerate(rows)]
    t = trace_agreement(judged, [traced_side(o) for *_, o in rows])
    assert (t["judgments"], t["traced_right"], t["follows"]) == (3, 2, 2)
    assert t["follows_rate"] == pytest.approx(2 / 3)
    # the report reads it back from a run's judgments.jsonl when metrics.json predates the metric
    write_rows(tmp_path / "judgments.jsonl", [
        {"id": j.pair_id, "author": "x", "negative_type": "cross_author", "real_at": j.real_at,
         "scores": list(j.scores) if j.scores else None, "failure": j.failure, "output": o}
        for j, (*_, o) in zip(judged, rows)])
    (tmp_path / "metrics.json").write_text(json.dumps({"label": "old run"}))
    assert trace_of(tmp_path) == t
