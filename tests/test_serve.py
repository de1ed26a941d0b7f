"""``persrm serve``: OpenRLHF's own HTTP reward client against the server, auth, limits, judge
timeouts and many concurrent clients. Servers run on 127.0.0.1, on a free port, in a thread."""

from __future__ import annotations

import asyncio
import logging
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
    _, reward = config_from_args(make_parser().parse_args(["--reward.neutral_reward", "-0.5",
                                                            "--reward.failure_reward", "-0.75"]))
    assert reward == {"neutral_reward": -0.5, "failure_reward": -0.75}
    assert main(["--reward.mode", "score_diff"]) == 2  # no judge source: refused before serving
    assert main(["--reward.endpoint", "http://x:1", "--reward.mode", "elo"]) == 2


# --------------------------------------------------------------------------- bad input and limits

def test_deeply_nested_json_is_a_400_not_a_500(stub_server):
    url, _ = stub_server
    for body in (b"[" * 20_000 + b"]" * 20_000, b'{"query": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"):
        response = httpx.post(url + "/get_reward", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "nested" in response.json()["detail"]


def test_a_lone_surrogate_fails_its_own_sample_only(stub_server):
    url, _ = stub_server
    queries = [f'"{PROMPT}sample {i} SCORE=9"' for i in range(8)]
    queries[3] = '"' + PROMPT.replace("\n", "\\n") + 'bad \\ud800 text"'
    queries = [q.replace("\n", "\\n") for q in queries]
    label_json = '{"exemplars": ["Up at six."], "reference": "REF SCORE=4", "prompt": "Your morning?"}'
    prompt_json = '"' + PROMPT.replace("\n", "\\n") + '"'
    body = ('{"query": [' + ", ".join(queries) + '], "prompts": [' + ", ".join([prompt_json] * 8)
            + '], "labels": [' + ", ".join([label_json] * 8) + "]}").encode()
    response = httpx.post(url + "/get_reward", content=body, headers={"Content-Type": "application/json"})
    out = response.json()
    assert response.status_code == 200, out
    assert out["rewards"][3] == -1.0 and out["extra_logs"]["judge_fail_bad_input"][3] == 1.0
    assert [r for i, r in enumerate(out["rewards"]) if i != 3] == pytest.approx([5 / 9] * 7)
    assert sum(out["extra_logs"]["judge_errors"]) == 0  # not a judge error
    raw = b'{"exemplars": ["e"], "response_a": "a \\udfff", "response_b": "b"}'
    response = httpx.post(url + "/judge", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "surrogate" in response.json()["detail"]


def test_a_stalled_body_gets_408_and_the_connection_back():
    import socket

    with running_server(make_app(PersRMReward(backend=StubJudge()), ServeConfig(body_timeout_s=0.5))) as url:
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"query\": [")
            start = time.monotonic()
            data = b""
            while True:  # the server answers, then closes
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            elapsed = time.monotonic() - start
        assert data.startswith(b"HTTP/1.1 408") and b"--body_timeout_s" in data
        assert elapsed < 0.5 + 4.0  # closed at once, not after uvicorn's 5 s keep-alive


def test_judgments_per_request_are_capped_and_the_queue_is_bounded():
    judge = StubJudge(sleep=1.0)
    reward = PersRMReward(backend=judge, votes=2, temperature=0.7)
    cfg = ServeConfig(max_request_judgments=8, max_queued_judgments=12)
    with running_server(make_app(reward, cfg)) as url:
        three = {"query": [PROMPT + f"s{i}" for i in range(3)], "prompts": [PROMPT] * 3, "labels": [label()] * 3}
        too_many = httpx.post(url + "/get_reward", json=three)  # 3 x 2 orders x 2 votes = 12 > 8
        assert too_many.status_code == 413 and "--max_request_judgments 8" in too_many.json()["detail"]
        replies: list = []

        def send(i: int) -> None:
            body = {"query": [PROMPT + f"q{i} a", PROMPT + f"q{i} b"], "prompts": [PROMPT] * 2,
                    "labels": [label()] * 2}  # 8 judgments each
            replies.append(httpx.post(url + "/get_reward", json=body, timeout=30))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 429]
        busy = next(r for r in replies if r.status_code == 429)
        assert "--max_queued_judgments 12" in busy.json()["detail"] and busy.headers["retry-after"]
        assert httpx.get(url + "/health").json()["busy"] == 1


# --------------------------------------------------------------------------- tokens, logs, port

def test_the_token_comes_from_the_environment_or_a_file_and_may_be_non_ascii(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PERSRM_SERVE_TOKEN", "from-env")
    cfg, _ = config_from_args(make_parser().parse_args(["--reward.backend", "stub"]))
    assert cfg.token == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("clé-secrète-✓\n", encoding="utf-8")
    cfg, _ = config_from_args(make_parser().parse_args(["--token_file", str(token_file)]))
    assert cfg.token == "clé-secrète-✓"
    with pytest.raises(ValueError, match="--token_file"):
        config_from_args(make_parser().parse_args(["--token_file", str(tmp_path / "missing")]))
    with caplog.at_level(logging.WARNING, logger="openrlhf_persrm.serve"):
        config_from_args(make_parser().parse_args(["--token", "argv-token"]))
    assert "visible" in caplog.text and "--token_file" in caplog.text
    with running_server(make_app(PersRMReward(backend=StubJudge()), cfg)) as url:
        body = {"query": [PROMPT + "SCORE=9"], "prompts": [PROMPT], "labels": [label()]}
        good = httpx.post(url + "/get_reward", json=body,
                          headers={"Authorization": "Bearer clé-secrète-✓".encode()})
        assert good.status_code == 200
        bad = httpx.post(url + "/get_reward", json=body, headers={"Authorization": "Bearer cle-secrete".encode()})
        assert bad.status_code == 401


def test_logs_are_quiet_at_warning(caplog):
    from openrlhf_persrm.serve import setup_logging

    root = logging.getLogger()
    saved = (root.level, logging.getLogger("httpx").level)
    try:
        setup_logging("warning")
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)  # no "HTTP Request:" per judgment
        setup_logging("info")
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        logging.getLogger("httpx").setLevel(saved[1])
    with FakeOpenAIServer(model="persrm", bad_content_rate=0.0) as judge_server:
        reward = PersRMReward(endpoint=judge_server.base_url, served_model="persrm", probe_on_start=False)
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                reward([PROMPT + f"Up at six {i}."], [PROMPT], [label("Up early.")])
        reward.judge.close()
    assert [r for r in caplog.records if r.name.startswith(("openrlhf_persrm", "httpx"))] == []


def test_the_default_port_clashes_with_neither_vllm_nor_openrlhf_serve_rm():
    import re
    from pathlib import Path

    import openrlhf

    source = (Path(openrlhf.__file__).parent / "cli" / "serve_rm.py").read_text()
    serve_rm_port = int(re.search(r'"--port", type=int, default=(\d+)', source).group(1))
    port = ServeConfig().port
    assert port not in (8000, serve_rm_port) and make_parser().parse_args([]).port == port


def test_judge_failures_are_logged_once_per_kind_with_counts(caplog):
    reward = PersRMReward(backend=StubJudge(garble_greedy=True), parse_retries=0, stop_after_steps=0)
    reward.health.summary_every_s = 0.0  # a summary after every call
    with caplog.at_level(logging.WARNING, logger="openrlhf_persrm"):
        for _ in range(3):
            reward([PROMPT + "SCORE=9"], [PROMPT], [label()])
    first = [r.getMessage() for r in caplog.records if "first seen" in r.getMessage()]
    assert first == ["persrm: judge failure 'no_reasoning' first seen: no <think>...</think> reasoning before the "
                     "answer"]
    assert "judge failures so far: no_reasoning=6 (3 of 3 samples failed)" in caplog.text


def test_sigint_stops_the_server_with_status_0(tmp_path):
    """Ctrl-C is a stop the user asked for: after uvicorn's graceful shutdown the process exits 0
    (uvicorn re-raises the signal, which under asyncio.run may surface as KeyboardInterrupt)."""
    import signal
    import socket
    import sys
    import urllib.request
    from pathlib import Path

    from conftest import log_tail, spawn, wait_or_fail

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stubs = Path(__file__).with_name("_judge_stubs.py")
    log = tmp_path / "serve.log"
    for attempt in range(3):  # the race it guards against is timing-dependent: stop it a few times
        server = spawn([sys.executable, "-m", "openrlhf_persrm.cli.main", "serve", "--port", str(port),
                        "--reward.backend", f"{stubs}:StubJudge"], tmp_path, log)
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"persrm serve exited early:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"persrm serve not healthy in 60 s:\n{log_tail(log)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        server.send_signal(signal.SIGINT)
        status = wait_or_fail(server, log, 30, "persrm serve, after SIGINT,")
        assert status == 0, log_tail(log)
