"""``persrm serve`` against hostile or broken clients and judges: each defect an external probe
found gets a 4xx or fails its own sample, slow connections are closed, every answer keeps the
deadline, and ``/health`` tells the truth now. Servers run on 127.0.0.1 in a thread; the
timeouts are short and the bounds generous (the machine is shared), never exact timings."""

from __future__ import annotations

import doctest
import json
import logging
import pickle
import socket
import threading
import time

import httpx
import pytest

from _fault_judge import FaultJudge
from _judge_stubs import StubJudge
from openrlhf_persrm.rewards.judge_health import JudgeHealth
from openrlhf_persrm.rewards.persrm import PersRMReward
from openrlhf_persrm.serve import ServeConfig, make_app, running_server

EXEMPLARS = ["Up at six. Dog walked. Coffee, black.", "Rain again; I walked anyway."]
PROMPT = "<|im_start|>user\nYour morning?<|im_end|>\n<|im_start|>assistant\n"
LABEL = {"exemplars": EXEMPLARS, "reference": "REF SCORE=4", "prompt": "Your morning?"}
SLACK = 2.5  # seconds: generous, the machine is shared


def post(url: str, path: str, body: bytes, **kw) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      timeout=kw.pop("timeout", 30), **kw)


def reward_body(queries: list[str], labels: list) -> bytes:
    return json.dumps({"query": queries, "prompts": [PROMPT] * len(queries), "labels": labels}).encode()


@pytest.fixture(scope="module")
def server():
    with running_server(make_app(PersRMReward(backend=StubJudge()), ServeConfig())) as url:
        yield url


# --------------------------------------------------------------------------- bodies

def test_a_label_nested_past_the_recursion_limit_fails_its_sample_alone(server):
    # ~600 levels: JSON reads them, but walking them recursively (2 frames a level) raised RecursionError: a 500
    deep_list = "[" * 600 + "]" * 600
    deep_extra = '{"exemplars": ["Up at six."], "reference": "REF SCORE=4", "notes": ' + deep_list + "}"
    body = ('{"query": ["SCORE=9", "SCORE=9", "SCORE=9"], "prompts": ["", "", ""], '
            '"labels": [' + json.dumps(LABEL) + ", " + deep_list + ", " + deep_extra + "]}").encode()
    response = post(server, "/get_reward", body)
    out = response.json()
    assert response.status_code == 200, out
    assert out["extra_logs"]["bad_label"] == [0.0, 1.0, 0.0]  # a list is no label; deep extra fields are fine
    assert out["rewards"] == pytest.approx([5 / 9, -1.0, 5 / 9])


@pytest.mark.parametrize("bad", ["[" * 100_000, '{"exemplars": ["e"], "reference": ' + "7" * 5000 + "}"])
def test_a_label_string_holding_json_too_deep_or_too_long_to_read_fails_its_sample_alone(server, bad):
    response = post(server, "/get_reward", reward_body(["SCORE=9", "SCORE=9"], [LABEL, bad]))
    out = response.json()
    assert response.status_code == 200, out
    assert out["extra_logs"]["bad_label"] == [0.0, 1.0] and out["rewards"] == pytest.approx([5 / 9, -1.0])


@pytest.mark.parametrize("path", ["/get_reward", "/judge"])
def test_an_integer_of_more_than_4300_digits_is_a_400(server, path):
    huge = b"9" * 4301  # Python's int() refuses it: a ValueError that was a 500
    body = (b'{"query": ["q"], "labels": [{"n": ' + huge + b"}]}" if path == "/get_reward"
            else b'{"exemplars": ["e"], "response_a": "a", "response_b": "b", "n": ' + huge + b"}")
    response = post(server, path, body)
    assert response.status_code == 400 and "4300 digits" in response.json()["detail"]


def test_raw_invalid_utf8_fails_its_own_sample_only(server):
    queries = [f"{PROMPT}sample {i} SCORE=9".encode() for i in range(4)]
    queries[2] = PROMPT.encode() + b"caf\xe9 \xff\xfe SCORE=9"  # Latin-1 bytes, not UTF-8
    labels = [json.dumps(LABEL).encode()] * 4
    labels[3] = b'{"exemplars": ["Up at six \xc3\x28."], "reference": "REF SCORE=4"}'  # a broken 2-byte sequence
    body = (b'{"query": [' + b", ".join(json.dumps(q.decode("utf-8", "surrogateescape"),
                                                   ensure_ascii=False).encode("utf-8", "surrogateescape")
                                        for q in queries)
            + b'], "prompts": [' + b", ".join([json.dumps(PROMPT).encode()] * 4) + b'], "labels": ['
            + b", ".join(labels) + b"]}")
    response = post(server, "/get_reward", body)
    out = response.json()
    assert response.status_code == 200, out
    assert out["extra_logs"]["judge_fail_bad_input"] == [0.0, 0.0, 1.0, 1.0]
    assert out["rewards"] == pytest.approx([5 / 9, 5 / 9, -1.0, -1.0])
    raw = b'{"exemplars": ["e"], "response_a": "caf\xe9", "response_b": "b"}'
    response = post(server, "/judge", raw)  # /judge is one sample: its request fails
    assert response.status_code == 422 and "not valid UTF-8" in response.json()["detail"]


class SurrogateJudge:
    """A judge whose output holds a lone surrogate (a broken detokenizer, or a proxy's decoding)."""

    name = "surrogate"

    def generate(self, requests):
        return ["<think>odd \ud800 byte</think><answer>[3, 8]</answer>"] * len(requests)


def test_a_lone_surrogate_in_the_judges_output_reaches_the_client_as_utf8():
    with running_server(make_app(PersRMReward(backend=SurrogateJudge()))) as url:
        response = post(url, "/judge", json.dumps({"exemplars": ["e"], "response_a": "a", "response_b": "b"}).encode())
    out = response.json()
    assert response.status_code == 200 and out["scores"] == [3, 8]
    assert out["text"] == "<think>odd \ufffd byte</think><answer>[3, 8]</answer>"


# --------------------------------------------------------------------------- connections

def _address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("/", 1)[1].split(":")
    return host, int(port)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent before."""
    sock.settimeout(0.1)
    data, until = b"", time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def test_a_silent_connection_is_closed_after_the_idle_timeout():
    cfg = ServeConfig(idle_timeout_s=0.3, header_timeout_s=30)
    with running_server(make_app(PersRMReward(backend=StubJudge()), cfg)) as url:
        with socket.create_connection(_address(url), timeout=10) as sock:
            start = time.monotonic()
            closed, data = _closed_within(sock, 0.3 + SLACK)
        assert closed and data == b"" and time.monotonic() - start >= 0.25


def test_a_request_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout():
    cfg = ServeConfig(idle_timeout_s=1.0, header_timeout_s=1.5)
    with running_server(make_app(PersRMReward(backend=StubJudge()), cfg)) as url:
        with socket.create_connection(_address(url), timeout=10) as sock:
            start = time.monotonic()
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
            closed = False
            for byte in head:  # every 0.1 s, well inside the idle timeout: only the header timeout stops it
                try:
                    sock.sendall(bytes([byte]))
                except ConnectionError:
                    closed = True
                    break
                closed, data = _closed_within(sock, 0.1)
                if closed:
                    break
            elapsed = time.monotonic() - start
        assert closed and 1.4 <= elapsed < 1.5 + SLACK
        assert closed and (data.startswith(b"HTTP/1.1 408") or data == b"")
        # a connection with an answer, then a slow second head: the same bound from the answer
        with socket.create_connection(_address(url), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)  # the whole answer arrives; then half a second head, which never ends
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            closed, data = _closed_within(sock, 1.5 + SLACK)
            assert closed and data.startswith(b"HTTP/1.1 200") and data.endswith(b"HTTP/1.1 408 Request Timeout\r\n"
                                                                                 b"content-length: 0\r\nconnection: "
                                                                                 b"close\r\n\r\n")


def test_many_half_open_connections_are_all_closed_and_the_server_keeps_answering():
    cfg = ServeConfig(idle_timeout_s=0.5, header_timeout_s=1.0)
    with running_server(make_app(PersRMReward(backend=StubJudge()), cfg)) as url:
        socks = [socket.create_connection(_address(url), timeout=10) for _ in range(300)]
        try:
            for i, sock in enumerate(socks):
                if i % 2:  # half of them start a request and never finish its head
                    sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n")
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            time.sleep(1.0)
            still_open = [s for s in socks if not _closed_within(s, 0.05 + SLACK / 10)[0]]
            time.sleep(SLACK if still_open else 0)
            still_open = [s for s in still_open if not _closed_within(s, 0.05)[0]]
            assert still_open == []
            assert httpx.get(url + "/health", timeout=10).status_code == 200
        finally:
            for sock in socks:
                sock.close()


# --------------------------------------------------------------------------- the deadline

class SlowCountingJudge(StubJudge):
    """Counts tokens slowly (a tokenizer server under load): the reward's label preparation drags."""

    def count_text_tokens(self, text: str) -> int:
        time.sleep(0.25)
        return len(text) // 4


def _send_twice(url: str, body: bytes, gap_s: float) -> dict[str, tuple[float, httpx.Response]]:
    """The body, then the same body again ``gap_s`` later (OpenRLHF's retry), concurrently."""
    replies: dict[str, tuple[float, httpx.Response]] = {}

    def send(name: str) -> None:
        start = time.monotonic()
        response = post(url, "/get_reward", body)
        replies[name] = (time.monotonic() - start, response)

    first = threading.Thread(target=send, args=("first",))
    first.start()
    time.sleep(gap_s)
    send("retry")
    first.join()
    return replies


def _wait_idle(url: str) -> None:
    until = time.monotonic() + 30  # the computation left running ends on its own
    while httpx.get(url + "/health").json()["judge"]["in_flight"] and time.monotonic() < until:
        time.sleep(0.2)
    assert httpx.get(url + "/health").json()["judge"]["in_flight"] == 0


def test_label_preparation_counts_against_the_deadline():
    deadline = 1.0
    reward = PersRMReward(backend=SlowCountingJudge(), deadline_s=deadline, stop_after_steps=0)
    body = reward_body([PROMPT + f"s{i} SCORE=9" for i in range(8)], [LABEL] * 8)  # ~4 s of preparation
    with running_server(make_app(reward)) as url:
        for name, (elapsed, response) in _send_twice(url, body, 0.4).items():
            out = response.json()
            assert response.status_code == 200 and elapsed < deadline + SLACK, (name, elapsed)
            assert out["rewards"] == [-1.0] * 8 and out["extra_logs"]["judge_fail_deadline"] == [1.0] * 8
        _wait_idle(url)


class StuckReward:
    """A reward call that overruns its deadline until released (a stuck tokenizer, a backend that
    ignores its deadline), with the real health record the server reads."""

    name = "stuck"
    deadline_s = 1.0
    failure_reward = -1.0

    def __init__(self) -> None:
        self.health = JudgeHealth()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, queries, prompts, labels, **kwargs):
        from openrlhf_persrm.contracts import RewardOutput

        self.calls += 1
        self.release.wait(60)
        return RewardOutput([0.5] * len(queries), [0.75] * len(queries), {})


def test_every_answer_and_a_joining_retry_keep_their_own_deadline_whatever_runs_behind():
    reward = StuckReward()
    body = reward_body([PROMPT + "a", PROMPT + "b"], [LABEL] * 2)
    with running_server(make_app(reward)) as url:
        try:
            replies = _send_twice(url, body, 0.4)
            for name, (elapsed, response) in replies.items():
                out = response.json()
                assert response.status_code == 200 and elapsed < reward.deadline_s + SLACK, (name, elapsed)
                assert out["rewards"] == [-1.0] * 2 and out["extra_logs"]["judge_fail_deadline"] == [1.0] * 2
            health = httpx.get(url + "/health").json()
            assert reward.calls == 1 and health["retried"] == 1  # the retry joined, it did not start again
            assert health["overdue"] == 2 and health["judge"]["in_flight"] == 1
        finally:
            reward.release.set()
        _wait_idle(url)
        late = post(url, "/get_reward", body).json()  # a later retry gets the answer that came late
        assert late["rewards"] == [0.5, 0.5] and reward.calls == 1


# --------------------------------------------------------------------------- /health

def _reward_for(url: str, **kw) -> PersRMReward:
    config = dict(endpoint=url, served_model="persrm", deadline_s=3.0, timeout=30.0, probe_on_start=False,
                  stop_after_steps=0, backend_config={"retries": 0})
    return PersRMReward(**{**config, **kw})


def test_health_sees_a_judge_that_hangs_now_before_any_sample_fails():
    with FaultJudge("hang") as judge:
        reward = _reward_for(judge.url, deadline_s=4.5)  # calls hanging over deadline_s / 3 = 1.5 s: hanging
        with running_server(make_app(reward)) as url:
            assert httpx.get(url + "/health").json()["status"] == "ok"
            replies: list = []
            sender = threading.Thread(target=lambda: replies.append(
                post(url, "/get_reward", reward_body([PROMPT + "SCORE=9"], [LABEL]))))
            sender.start()
            seen = []
            while sender.is_alive():  # the call fails at its deadline; /health must say so before
                info = httpx.get(url + "/health").json()
                if not replies:
                    seen.append(info)
                time.sleep(0.2)
            hanging = [i for i in seen if i["status"] == "degraded"]
            assert hanging and hanging[0]["judge"]["hanging_for_s"] >= 1.5
            assert hanging[0]["judge"]["failed_samples"] == 0  # nothing failed yet: the state is now, not a window
            assert replies[0].json()["rewards"] == [-1.0]
        reward.judge.close()


def test_health_details_and_the_judges_url_need_the_token():
    with FaultJudge("ok") as judge:
        reward = _reward_for(judge.url)
        with running_server(make_app(reward, ServeConfig(token="s3cret"))) as url:
            auth = {"Authorization": "Bearer s3cret"}
            assert post(url, "/get_reward", reward_body(["SCORE=9"], [LABEL]), headers=auth).status_code == 200
            bare = httpx.get(url + "/health")
            assert bare.status_code == 200 and bare.json() == {"status": "ok"}
            assert str(judge.port) not in bare.text
            wrong = httpx.get(url + "/health", headers={"Authorization": "Bearer nope"})
            assert wrong.json() == {"status": "ok"}
            full = httpx.get(url + "/health", headers=auth).json()
            assert str(judge.port) in full["judge"]["backend"]["base_url"] and full["requests"] == 1
        reward.judge.close()


def test_down_recovers_when_a_probe_answers_and_stays_down_while_probes_fail(caplog):
    caplog.set_level(logging.WARNING, logger="openrlhf_persrm")
    body = reward_body([PROMPT + "a", PROMPT + "b"], [LABEL] * 2)
    with FaultJudge("500") as judge:
        reward = _reward_for(judge.url, stop_after_steps=1, stop_window=2)
        reward.health.cooldown_s = 0.2
        with running_server(make_app(reward)) as url:
            tripped = post(url, "/get_reward", body)  # both samples fail: one bad window trips the rule
            assert tripped.status_code == 503 and "stop_after_steps=1" in tripped.json()["detail"]
            for _ in range(3):  # a dead judge: probes fail, 503 stays
                time.sleep(0.5)
                assert post(url, "/get_reward", body).status_code == 503
            info = httpx.get(url + "/health")
            assert info.status_code == 503 and info.json()["judge"]["breaker"]["failed_probes"] >= 1
            assert "judge still down, the probe failed" in caplog.text
            judge.fault = "ok"  # the judge comes back
            until, status = time.monotonic() + 20, 503
            while status == 503 and time.monotonic() < until:
                time.sleep(0.3)
                status = post(url, "/get_reward", body).status_code
            assert status == 200
            health = httpx.get(url + "/health").json()
            assert health["status"] == "ok" and health["judge"]["breaker"]["recoveries"] == 1
            assert "judge recovered" in caplog.text
        reward.judge.close()


# --------------------------------------------------------------------------- JudgeHealth itself

def test_the_recent_failure_rate_is_the_latest_samples_not_the_last_closed_window():
    health = JudgeHealth(threshold=0.5, steps=0, window=64)
    for _ in range(64):
        health.record(1, 0, 2, {}, {})
    for _ in range(33):  # the judge breaks now: the sliding rate sees it before a window closes
        health.record(1, 1, 2, {"timeout": 2}, {"timeout": "x"})
    assert health.snapshot()["state"] == "degraded" and health.recent_failure_rate == pytest.approx(33 / 64)


def test_calls_in_flight_with_no_judgment_back_are_hanging():
    health = JudgeHealth(hang_after_s=0.05)
    call = health.begin()
    time.sleep(0.1)
    snap = health.snapshot()
    assert snap["state"] == "degraded" and snap["in_flight"] == 1 and snap["hanging_for_s"] >= 0.05
    health.record(1, 0, 2, {}, {})  # a judgment came back since that call began: slow, not hanging
    assert health.snapshot()["state"] == "ok"
    health.end(call)
    assert health.snapshot()["in_flight"] == 0 and health.snapshot(hang_after_s=0.0)["state"] == "ok"


def test_the_breaker_opens_probes_half_open_backs_off_and_closes(caplog):
    caplog.set_level(logging.WARNING, logger="openrlhf_persrm")
    health = JudgeHealth(threshold=0.5, steps=1, window=2, cooldown_s=0.05, max_cooldown_s=1.0)
    assert health.record(2, 2, 4, {"server_error": 4}, {"server_error": "HTTP 500"}) is not None
    assert health.stopped and health.breaker == "open" and not health.probe_due
    seen: list = []

    def failing() -> None:
        seen.append((health.breaker, health.stopped is not None))
        raise ConnectionError("refused")

    time.sleep(0.06)
    assert health.recover(failing) is False and seen == [("half_open", True)]
    assert health.breaker == "open" and health.failed_probes == 1
    assert 0.05 < health.snapshot()["breaker"]["next_probe_in_s"] <= 0.1  # the cooldown doubled
    assert health.recover(lambda: seen.append("not due")) is False and "not due" not in seen
    time.sleep(0.11)
    assert health.recover(lambda: None) is True
    assert health.stopped is None and health.breaker == "closed" and health.snapshot()["state"] == "ok"
    assert "probing whether it is back" in caplog.text and "judge recovered" in caplog.text
    assert health.record(2, 2, 4, {"server_error": 4}, {}) is not None  # a new outage trips it again


def test_judge_health_pickles_its_settings_and_starts_fresh():
    health = JudgeHealth(threshold=0.3, steps=2, window=8, cooldown_s=7.0, max_cooldown_s=70.0, hang_after_s=9.0)
    health.record(8, 8, 16, {"timeout": 16}, {})
    copy = pickle.loads(pickle.dumps(health))
    assert (copy.threshold, copy.steps, copy.window, copy.cooldown_s, copy.max_cooldown_s, copy.hang_after_s) == \
        (0.3, 2, 8, 7.0, 70.0, 9.0)
    assert copy.samples == 0 and copy.breaker == "closed" and copy.snapshot()["in_flight"] == 0


def test_the_doctests_of_the_wire_format_and_the_labels():
    from openrlhf_persrm.rewards import labels
    from openrlhf_persrm.server import wire

    for module in (wire, labels):
        result = doctest.testmod(module)
        assert result.attempted and not result.failed, module.__name__
