"""``persrm serve``: OpenRLHF's own HTTP reward client against the server, auth, limits, judge
timeouts and many concurrent clients. Servers run on 127.0.0.1, on a free port, in a thread."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from _judge_stubs import StubJudge
from _openai_server import FakeOpenAIServer
from openrlhf_persrm.rewards.persrm import PersRMReward
from openrlhf_persrm.serve import ServeConfig, config_from_args, main, make_app, make_parser, running_server

EXEMPLARS = ["Up at six. Dog walked. Coffee, black.", "Rain again; I walked anyway."]
PROMPT = "<|im_start|>user\nYour morning?<|im_end|>\n<|im_start|>assistant\n"


def label(reference: str = "REF SCORE=4") -> dict:
    return {"exemplars": EXEMPLARS, "reference": reference, "prompt": "Your morning?"}


def openrlhf_rewards(url: str, queries, prompts, labels) -> list[dict]:
    """Rewards exactly as OpenRLHF 0.11.2's rollout code fetches them (its own client, unchanged)."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=[url + "/get_reward"])
    return asyncio.run(executor._fetch_rewards_via_http(queries, prompts, labels))


@pytest.fixture(scope="module")
def stub_server():
    judge = StubJudge(sleep=0.05)
    reward = PersRMReward(backend=judge)
    cfg = ServeConfig(max_batch=8, max_request_bytes=64_000, max_candidate_chars=2_000)
    with running_server(make_app(reward, cfg)) as url:
        yield url, judge


def test_openrlhf_client_talks_to_the_server_unchanged(stub_server):
    url, _ = stub_server
    [info] = openrlhf_rewards(url, [PROMPT + "Up at six. SCORE=9<|im_end|>", PROMPT + "SCORE=2<|im_end|>"],
                              [PROMPT, PROMPT], [label(), label()])
    assert info["rewards"] == pytest.approx([5 / 9, -2 / 9])
    assert info["scores"] == pytest.approx([(1 + 5 / 9) / 2, (1 - 2 / 9) / 2])
    assert info["extra_logs"]["judge_failed"] == [0.0, 0.0] and info["extra_logs"]["sample_score"] == [9, 2]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["plugin"] == "persrm"


def test_raw_judgments(stub_server):
    url, _ = stub_server
    body = {"exemplars": EXEMPLARS, "prompt": "p", "response_a": "SCORE=3", "response_b": "SCORE=8"}
    out = httpx.post(url + "/judge", json=body).json()
    assert out["ok"] and out["scores"] == [3, 8] and out["preferred"] == "B"
    assert out["text"].endswith("<answer>[3, 8]</answer>") and out["failure"] is None
    out = httpx.post(url + "/judge", json={**body, "response_a": "FAIL"}).json()
    assert not out["ok"] and out["failure"] == "judge_error" and out["scores"] is None


@pytest.mark.parametrize("path, body, status, message", [
    ("/get_reward", b"{not json", 400, "not JSON"),
    ("/get_reward", b'["a list"]', 422, "JSON object"),
    ("/get_reward", b'{"query": ["q"], "prompts": ["p"]}', 422, "labels"),
    ("/get_reward", b'{"query": [1], "prompts": ["p"], "labels": [{}]}', 422, "list of strings"),
    ("/get_reward", b'{"query": ["q", "r"], "prompts": ["p"], "labels": [{}, {}]}', 422, "one entry each"),
    ("/get_reward", b'{"query": ["q","q","q","q","q","q","q","q","q"], "labels": []}', 413, "--max_batch"),
    ("/get_reward", b'{"query": ["' + b"x" * 3000 + b'"], "labels": [{}]}', 413, "--max_candidate_chars"),
    ("/get_reward", b'{"query": ["' + b"x" * 70_000 + b'"]}', 413, "--max_request_bytes"),
    ("/judge", b'{"exemplars": [], "response_a": "a", "response_b": "b"}', 422, "exemplars"),
    ("/judge", b'{"exemplars": ["e"], "response_a": "a"}', 422, "response_b"),
    ("/judge", b'{"exemplars": ["e"], "response_a": "' + b"a" * 2001 + b'", "response_b": "b"}', 413, "2000"),
])
def test_malformed_requests_get_a_4xx_with_a_message(stub_server, path, body, status, message):
    url, _ = stub_server
    response = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status and message in response.json()["detail"]


def test_bad_labels_are_per_sample_not_per_request(stub_server):
    url, _ = stub_server
    response = httpx.post(url + "/get_reward", json={"query": [PROMPT + "SCORE=9", PROMPT + "SCORE=9"],
                                                     "prompts": [PROMPT, PROMPT], "labels": [label(), "nonsense"]})
    out = response.json()
    assert response.status_code == 200 and out["extra_logs"]["bad_label"] == [0.0, 1.0]
    assert out["rewards"][1] == -1.0  # the failure reward, no better than the worst judged score


def test_bearer_token():
    with running_server(make_app(PersRMReward(backend=StubJudge()), ServeConfig(token="s3cret"))) as url:
        body = {"query": [PROMPT + "SCORE=9"], "prompts": [PROMPT], "labels": [label()]}
        assert httpx.post(url + "/get_reward", json=body).status_code == 401
        wrong = httpx.post(url + "/get_reward", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = httpx.post(url + "/get_reward", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["rewards"] == pytest.approx([5 / 9])
        assert httpx.post(url + "/judge", json={}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200


def test_judge_timeouts_give_the_failure_reward_and_the_server_keeps_serving():
    # The served judge (a fake vLLM) stalls on every first attempt; the backend gives up after 0.3 s.
    with FakeOpenAIServer(slow_rate=1.0, slow_seconds=3.0, model="persrm") as judge_server:
        reward = PersRMReward(endpoint=judge_server.base_url, served_model="persrm", timeout=0.3,
                              backend_config={"retries": 0}, neutral_reward=-0.5)
        with running_server(make_app(reward)) as url:
            start = time.perf_counter()
            [info] = openrlhf_rewards(url, [PROMPT + "the dog"], [PROMPT], [label("the cat")])
            assert time.perf_counter() - start < 3.0
            assert info["rewards"] == [-0.5] and info["scores"] == [0.25]
            assert info["extra_logs"]["judge_failed"] == [1.0] and info["extra_logs"]["judge_errors"] == [2.0]
            assert info["extra_logs"]["judge_fail_timeout"] == [2.0]
            health = httpx.get(url + "/health").json()
            assert health["status"] in ("ok", "degraded") and health["judge"]["failures"] == {"timeout": 2}
        reward.judge.close()


def test_64_concurrent_clients_each_get_their_own_answer(stub_server):
    url, judge = stub_server
    judge.calls["max_in_flight"] = 0

    async def one(i: int):
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        executor = SingleTurnAgentExecutor(remote_rm_url=[url + "/get_reward"])
        sample, ref = 1 + i % 10, 1 + (i * 7) % 10
        [info] = await executor._fetch_rewards_via_http([PROMPT + f"client {i} SCORE={sample}<|im_end|>"], [PROMPT],
                                                        [label(f"REF {i} SCORE={ref}")])
        return info["rewards"][0], (sample - ref) / 9

    async def everyone():
        return await asyncio.gather(*(one(i) for i in range(64)))

    start = time.perf_counter()
    results = asyncio.run(everyone())
    elapsed = time.perf_counter() - start
    assert all(got == pytest.approx(want) for got, want in results)
    assert judge.calls["max_in_flight"] > 8  # the requests reached the backend together
    assert elapsed < 64 * 0.05  # ... so 64 calls of a 50 ms judge did not run one after another


def test_concurrent_http_requests_share_the_local_judges_batches(tiny_model):
    reward = PersRMReward(model=tiny_model, max_new_tokens=3, parse_retries=0,
                          backend_config={"batch_size": 16, "admission_window_s": 0.05})
    sizes: list[int] = []
    engine = reward.judge.engine
    forward = engine._forward
    engine._forward = lambda ids, *a, **k: (sizes.append(int(ids.shape[0])), forward(ids, *a, **k))[1]
    with running_server(make_app(reward)) as url:
        body = {"exemplars": EXEMPLARS, "prompt": "p", "response_a": "a", "response_b": "b"}
        replies: list = []
        threads = [threading.Thread(target=lambda i=i: replies.append(
            httpx.post(url + "/judge", json={**body, "response_a": f"a {i}"}, timeout=60).status_code))
            for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    reward.judge.close()
    assert replies == [200] * 6 and max(sizes) > 1


def test_command_line():
    args = make_parser().parse_args(["--port", "0", "--reward_config", '{"mode": "win_rate"}',
                                     "--reward.endpoint", "http://127.0.0.1:8000", "--reward.votes", "3",
                                     "--reward.temperature", "0.7", "--reward.require_reasoning", "false",
                                     "--reward.backend_config", '{"concurrency": 8}'])
    cfg, reward = config_from_args(args)
    assert cfg.host == "127.0.0.1" and cfg.token == ""
    assert reward == {"mode": "win_rate", "endpoint": "http://127.0.0.1:8000", "votes": 3, "temperature": 0.7,
                      "require_reasoning": False, "backend_config": {"concurrency": 8}}
    assert PersRMReward(**reward).backend_config == {"concurrency": 8}
    assert main(["--reward.mode", "score_diff"]) == 2  # no judge source: refused before serving
    assert main(["--reward.endpoint", "http://x:1", "--reward.mode", "elo"]) == 2
