"""Downstream policy GRPO on CPU with PersRM as the generative reward, through OpenRLHF's own
``train_ppo_ray``: judged by a ``persrm serve`` server (OpenRLHF's HTTP reward client calls it) or
by the judge in the rollout actors (``{"model": ...}``)."""

import json
import signal
import socket
import sys
import time
import urllib.request

import pytest
from conftest import log_tail, make_pair, run_cpu_launcher, spawn, tiny_grpo_cmd, wait_or_fail, write_rows

from openrlhf_persrm.compat import parse_step_logs

FAILURE_REWARD = -1.0  # the persrm reward's default
JUDGE = {"max_new_tokens": 24, "parse_retries": 0}  # the tiny judge's whole answer fits 24 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"persrm serve exited early ({proc.returncode}):\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"persrm serve did not become healthy in {timeout} s:\n{log_tail(log)}")


def _policy_cmd(tmp_path, tiny_model, reward_config: dict) -> list[str]:
    pairs = write_rows(tmp_path / "pairs.jsonl",
                       [make_pair(i, prompt=f"Morning {i}: Elinor walked out early.") for i in range(4)])
    return tiny_grpo_cmd(tmp_path, tiny_model, pairs, "--reward_plugin", "persrm", "--reward_plugin_config",
                         json.dumps(reward_config), "--dataset_plugin", "persrm_policy", "--data.max_len", "1024")


def assert_rewards_are_the_judges_verdicts(steps: dict, log: str) -> None:
    """The reward OpenRLHF trained on is the judge's verdict, failures paying ``failure_reward``.

    Per sample (``score_diff``, one vote per order): a judged sample's reward is ``(s - r) / 9`` with
    ``s``, ``r`` the sample's and the reference's scores averaged over both orders, and
    ``judge_failed`` 0; a sample without a readable judgment in both orders gets ``failure_reward``
    with ``s = r = 0`` and ``judge_failed`` 1. So ``reward = (s - r) / 9 + failure_reward *
    judge_failed`` per sample, and OpenRLHF's step metrics, the means of each over the step's samples
    (sample-weighted), obey the same linear relation.
    """
    assert sorted(steps) == [1, 2], log[-3000:]
    for logs in steps.values():
        for key in ("reward", "judge_failed", "sample_score", "reference_score", "position_consistent"):
            assert key in logs, (key, logs)
        expected = (logs["sample_score"] - logs["reference_score"]) / 9 + FAILURE_REWARD * logs["judge_failed"]
        assert logs["reward"] == pytest.approx(expected, abs=1e-4), logs
    # at least one sample really judged (both orders read), so the relation is not all failures
    assert any(logs["judge_failed"] < 1.0 and logs["sample_score"] >= 1.0 for logs in steps.values()), steps


@pytest.mark.slow
def test_policy_grpo_against_a_served_persrm_judge(tmp_path, tiny_model, tiny_judge):
    port = _free_port()
    serve_log = tmp_path / "serve.log"
    server = spawn([sys.executable, "-m", "openrlhf_persrm.cli.main", "serve", "--port", str(port),
                    "--reward.model", tiny_judge, "--reward.max_new_tokens", str(JUDGE["max_new_tokens"]),
                    "--reward.parse_retries", str(JUDGE["parse_retries"])], tmp_path, serve_log)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", server, serve_log)
        cmd = _policy_cmd(tmp_path, tiny_model, {"serve_url": f"http://127.0.0.1:{port}"})
        rc, log = run_cpu_launcher(cmd, tmp_path)
        assert rc == 0, log[-6000:]
        assert "reward plugin persrm is served at http://127.0.0.1" in log
        # the judge's own logs, computed in the server, reach OpenRLHF's per-step metrics
        assert_rewards_are_the_judges_verdicts(parse_step_logs(log), log)
    finally:
        server.send_signal(signal.SIGINT)
        status = wait_or_fail(server, serve_log, 60, "persrm serve, after SIGINT,")
    out = serve_log.read_text()
    assert status == 0, out[-3000:]
    assert out.count("POST /get_reward") >= 16, out[-3000:]  # OpenRLHF's HTTP client called it for every sample
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.slow
def test_policy_grpo_with_the_in_process_persrm_judge(tmp_path, tiny_model, tiny_judge):
    cmd = _policy_cmd(tmp_path, tiny_model, {"model": tiny_judge, **JUDGE})
    rc, log = run_cpu_launcher(cmd, tmp_path)
    assert rc == 0, log[-6000:]
    assert "reward plugin persrm is served" not in log
    steps = parse_step_logs(log)
    assert_rewards_are_the_judges_verdicts(steps, log)
    # judged in the rollout actors, through the entry file (which adds plugin_error), never raising
    assert all(logs["plugin_error"] == 0.0 for logs in steps.values()), steps


def _last_lines(log: str, n: int = 4) -> str:
    return "\n".join(log.strip().splitlines()[-n:])


@pytest.mark.slow
def test_a_judge_that_goes_down_ends_the_run_with_the_cause_in_its_last_lines(tmp_path, tiny_model):
    import threading

    from _fault_judge import FaultJudge

    with FaultJudge("ok") as judge:
        def down_after_the_probe() -> None:  # up at start-up, then every request fails (HTTP 500)
            while judge.stats["answered"] < 1:
                time.sleep(0.05)
            judge.fault = "500"

        threading.Thread(target=down_after_the_probe, daemon=True).start()
        config = {"endpoint": judge.url, "served_model": "persrm", "backend_config": {"retries": 0},
                  "stop_window": 4, "stop_after_steps": 1}  # the stop rule trips on the first 4 samples
        rc, log = run_cpu_launcher(_policy_cmd(tmp_path, tiny_model, config), tmp_path)
    assert judge.stats["answered"] == 1 and judge.stats["/v1/chat/completions"] > 1, judge.stats
    assert rc == 1, log[-6000:]
    last = _last_lines(log)
    assert ("error: train_ppo_ray stopped: no reward for a sample: JudgeUnavailable: the judge failed 100% of the "
            "samples in 1 windows of 4") in last, log[-6000:]
    assert "server_error" in last, last
    assert parse_step_logs(log) == {}  # no step trained on made-up rewards


@pytest.mark.slow
def test_a_judge_that_is_down_at_start_up_ends_the_run_with_the_cause_in_its_last_lines(tmp_path, tiny_model):
    from _fault_judge import FaultJudge

    with FaultJudge("500") as judge:
        config = {"endpoint": judge.url, "served_model": "persrm", "backend_config": {"retries": 0}}
        rc, log = run_cpu_launcher(_policy_cmd(tmp_path, tiny_model, config), tmp_path)
    assert rc == 1, log[-6000:]
    last = _last_lines(log)
    assert ("error: train_ppo_ray stopped: JudgeUnavailable: persrm: the judge (openai) failed its start-up probe "
            "(server_error)") in last, log[-6000:]
