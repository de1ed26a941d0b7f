"""Judge backends: ``openai`` against a real HTTP server speaking the OpenAI protocol, ``local`` on a
tiny random model (batching concurrent callers), both behind the JudgeBackend contract."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time

import pytest

from _openai_server import FakeOpenAIServer
from openrlhf_persrm.contracts import JudgeBackend, JudgeError, JudgeRequest
from openrlhf_persrm.judge_format import build_messages, parse_judgment
from openrlhf_persrm.judges.faults import JudgeDeadline, JudgeRejected
from openrlhf_persrm.judges.local import LocalJudge
from openrlhf_persrm.judges.openai_backend import OpenAIJudge
from openrlhf_persrm.judges.openai_client import v1_base_url
from openrlhf_persrm.registry import instantiate, judge_backends
from openrlhf_persrm.rewards.persrm import PersRMReward

EXEMPLARS = ["the cat sat on the mat and purred", "the cat slept in the sun all day"]


def requests(n: int, **kw) -> list[JudgeRequest]:
    return [JudgeRequest(build_messages(EXEMPLARS, f"Day {i}?", f"the cat sat {i}", f"a dog barked {i}"), **kw)
            for i in range(n)]


def test_backends_are_registered_and_honour_the_contract(tiny_model):
    assert judge_backends.get("openai") is OpenAIJudge and judge_backends.get("local") is LocalJudge
    judge = instantiate(judge_backends, "openai", {"base_url": "http://127.0.0.1:1", "model": "m"})
    assert isinstance(judge, JudgeBackend) and judge.base_url == "http://127.0.0.1:1/v1"
    assert isinstance(LocalJudge(tiny_model), JudgeBackend)
    assert v1_base_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    with pytest.raises(ValueError, match="not an http"):
        OpenAIJudge(base_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="model_path"):
        LocalJudge()


def test_importing_backends_and_server_is_cheap():
    code = ("import sys, openrlhf_persrm.judges.openai_backend, openrlhf_persrm.judges.local, "
            "openrlhf_persrm.rewards.persrm, openrlhf_persrm.serve; "
            "print([m for m in ('torch', 'transformers', 'httpx', 'fastapi', 'uvicorn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- openai

def test_openai_backend_from_many_threads_shares_bounded_concurrency():
    with FakeOpenAIServer(latency=0.05, bad_content_rate=0.0, model="persrm-7b") as srv:
        judge = OpenAIJudge(base_url=srv.base_url.removesuffix("/v1"), concurrency=4)  # model: discovered
        outputs: dict[int, list] = {}

        def ask(i: int) -> None:
            outputs[i] = judge.generate(requests(3, seed=i))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        judge.close()
    assert judge.model == "persrm-7b" and srv.max_in_flight == 4
    results = [parse_judgment(text) for out in outputs.values() for text in out]
    assert len(results) == 24 and all(r.ok for r in results)
    assert judge.stats["ok"] == 24


def test_openai_backend_failures_come_back_as_errors_not_exceptions():
    with FakeOpenAIServer(slow_rate=1.0, slow_seconds=2.0, model="m") as srv:
        # The fake server is slow on a request's first attempt only.
        judge = OpenAIJudge(base_url=srv.base_url, model="m", timeout=0.2, retries=0)
        out = judge.generate(requests(2))
        assert all(isinstance(o, JudgeError) and "timeout" in str(o) for o in out)
        assert judge.stats["timeouts"] == 2
        judge.close()
        patient = OpenAIJudge(base_url=srv.base_url, model="m", timeout=0.2, retries=1, backoff=0.01)
        out = patient.generate(requests(2, seed=5))
        assert all(isinstance(o, str) for o in out) and patient.stats["retries"] == 2
        patient.close()
    with FakeOpenAIServer() as srv:
        wrong = OpenAIJudge(base_url=srv.base_url, model="no-such-model", retries=0)
        out = wrong.generate(requests(2))
        assert all(isinstance(o, JudgeError) and "404" in str(o) for o in out) and wrong.stats["fatal"] == 2
        wrong.close()


def test_openai_backend_pickles_without_its_client():
    with FakeOpenAIServer(bad_content_rate=0.0, model="m") as srv:
        judge = OpenAIJudge(base_url=srv.base_url, model="m")
        assert parse_judgment(judge.generate(requests(1))[0]).ok
        clone = pickle.loads(pickle.dumps(judge))
        assert clone._runtime is None and parse_judgment(clone.generate(requests(1))[0]).ok
        judge.close()
        clone.close()


# --------------------------------------------------------------------------- local

def _record_batches(judge: LocalJudge) -> list[tuple[int, int]]:
    """(rows, tokens) of every forward pass the judge's engine makes from now on."""
    sizes: list[tuple[int, int]] = []
    engine = judge.engine
    forward = engine._forward

    def recording(input_ids, *args, **kwargs):
        sizes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    engine._forward = recording
    return sizes


def test_local_backend_batches_concurrent_callers_and_matches_one_at_a_time(tiny_model):
    reqs = requests(6, max_new_tokens=6)
    alone = LocalJudge(tiny_model, batch_size=1)
    expected = alone.generate(reqs)
    alone.close()

    judge = LocalJudge(tiny_model, batch_size=8, admission_window_s=0.05)
    sizes = _record_batches(judge)
    outputs: dict[int, str] = {}
    go = threading.Barrier(len(reqs))

    def ask(i: int) -> None:
        go.wait()
        outputs[i] = judge.generate([reqs[i]])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [outputs[i] for i in range(len(reqs))] == expected  # greedy: batching changes nothing
    assert max(rows for rows, _ in sizes) > 1  # requests from different threads shared forward passes
    # ... and their common prefix (system prompt + exemplars) was prefilled once, on its own
    assert any(rows == 1 and tokens > 100 for rows, tokens in sizes)
    assert judge.stats["ok"] == len(reqs)
    judge.close()


def test_local_backend_keeps_the_demo_api_and_times_out_per_request(tiny_model):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    judge = LocalJudge(tiny_model, batch_size=2)
    assert judge.tokenizer.chat_template and judge.count_tokens(requests(1)[0].messages) > 50
    bar = Bar()
    out = judge.generate(requests(3, max_new_tokens=4), progress=bar)
    assert len(out) == 3 and all(isinstance(o, str) for o in out) and bar.n == 3
    clone = pickle.loads(pickle.dumps(judge))
    assert clone._engine is None and clone.batch_size == 2
    judge.timeout = 0.05
    judge.engine.pause()  # a stalled engine: nothing finishes in time
    slow = judge.generate(requests(2, max_new_tokens=4))
    judge.engine.resume()
    assert all(isinstance(o, JudgeError) and "timeout" in str(o) for o in slow)
    assert judge.stats["timeouts"] == 2 and judge.engine.num_unfinished_requests() == 0  # aborted
    judge.timeout = 60
    judge.engine.pause()  # the caller's deadline comes first: aborted, reported as such
    start = time.monotonic()
    late = judge.generate(requests(2, max_new_tokens=4), deadline=time.monotonic() + 0.1)
    judge.engine.resume()
    assert time.monotonic() - start < 0.1 + 5 and all(isinstance(o, JudgeDeadline) for o in late)
    assert judge.stats["deadline"] == 2 and judge.engine.num_unfinished_requests() == 0
    assert isinstance(judge.generate(requests(1, max_new_tokens=2))[0], str)  # still serving
    too_long = [JudgeRequest(build_messages(["word " * 3000], "p", "a", "b"), max_new_tokens=2)]
    assert isinstance(judge.generate(too_long)[0], JudgeRejected)
    judge.close()


def test_persrm_reward_with_a_local_model_never_raises(tiny_model):
    # A random model writes noise: every judgment is unreadable, every sample neutral and counted.
    reward = PersRMReward(model=tiny_model, max_new_tokens=4, parse_retries=1, neutral_reward=-0.1)
    label = {"exemplars": EXEMPLARS, "reference": "the cat sat"}
    out = reward(["Q: the cat", "Q: a dog"], ["Q: "] * 2, [label, label])
    assert out.rewards == [-0.1, -0.1] and out.extra_logs["judge_failed"] == [1.0, 1.0]
    assert out.extra_logs["judge_unparseable"] == [2.0, 2.0] and out.extra_logs["judge_retries"] == [2.0, 2.0]
    reward.judge.close()
