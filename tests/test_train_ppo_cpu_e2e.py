"""Stage 2 end to end on CPU: OpenRLHF's unmodified train_ppo_ray (GRPO) through the wrapper,
with the persrm_rule reward and persrm_rl rows, rollouts in the CPU vLLM stand-in."""

import json
import signal
import time

import psutil
import pytest
from conftest import log_tail, make_pair, run_cpu_launcher, spawn, tiny_grpo_cmd, wait_or_fail, write_rows

from openrlhf_persrm.compat import parse_step_logs


def _ray_processes(marker):
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (proc.info["cmdline"] or [])):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_grpo_two_steps_on_cpu(tmp_path, tiny_judge):
    from _tiny import param_digests

    pairs = write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(4)])
    digest_dir = tmp_path / "engine"
    out_dir = tmp_path / "ckpt"
    cmd = tiny_grpo_cmd(tmp_path, tiny_judge, pairs, "--reward_plugin", "persrm_rule", "--dataset_plugin", "persrm_rl",
                        "--rollout.max_new_tokens", "24", "--rollout.temperature", "0.8", "--train.num_episodes", "1",
                        "--actor.adam.lr", "1e-3", "--ckpt.save_hf")
    rc, log = run_cpu_launcher(cmd, tmp_path, PERSRM_CPU_ENGINE_DIGEST_DIR=str(digest_dir))
    assert rc == 0, log[-6000:]

    # Per-step reward and the reward plugin's extra logs, as OpenRLHF logs them.
    steps = parse_step_logs(log)
    assert sorted(steps) == [1, 2], log[-3000:]
    for logs in steps.values():
        for key in ("reward", "accuracy", "format_ok", "margin", "plugin_error"):
            assert key in logs, (key, logs)
        assert logs["plugin_error"] == 0.0
    assert any(logs["format_ok"] > 0 for logs in steps.values())  # the judge format is alive

    # Training changed the weights, and the rollout engine holds exactly the saved checkpoint.
    initial, saved = param_digests(tiny_judge), param_digests(str(out_dir))
    assert saved != initial
    [engine_file] = list(digest_dir.glob("engine-*.json"))
    engine = json.loads(engine_file.read_text())
    assert set(saved) <= set(engine)
    assert {n: engine[n] for n in saved} == saved

    # Nothing left running: Ray and its workers are gone.
    assert _ray_processes("persrm-ray-") == []


def _wait_for(log, proc, marker, timeout):
    """Wait until ``marker`` is in the child's log; fails the test with the log's last lines past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if marker in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"{marker!r} not logged within {timeout} s (child status {proc.poll()}):\n{log_tail(log)}")


@pytest.mark.slow
def test_processes_are_gone_after_an_error_and_after_ctrl_c(tmp_path, tiny_model):
    # Raw pair rows without --dataset_plugin: OpenRLHF fails inside a Ray actor (no 'input' key).
    pairs = write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(2)])
    base = tiny_grpo_cmd(tmp_path, tiny_model, pairs, "--reward_plugin", "persrm_rule",
                         "--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4", "--train.micro_batch_size",
                         "2", "--rollout.micro_batch_size", "2", "--rollout.max_new_tokens", "8")
    rc, _ = run_cpu_launcher(base, tmp_path)
    assert rc != 0
    assert _ray_processes("persrm-ray-") == []

    # Ctrl-C while OpenRLHF is running: the wrapper shuts Ray down and exits 130.
    log = tmp_path / "interrupted.log"
    child = spawn(base, tmp_path, log)
    _wait_for(log, child, "CPU mode: local Ray", timeout=120)
    time.sleep(8)  # let Ray start its workers
    child.send_signal(signal.SIGINT)
    assert wait_or_fail(child, log, 120, "train_ppo_ray after Ctrl-C") in (1, 130)
    assert _ray_processes("persrm-ray-") == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--train.async_enable"],
                                  ["--train.colocate_all", "--vllm.sync_backend", "gloo", "--vllm.enable_sleep"]],
                         ids=["async", "colocate_sleep"])
def test_async_and_colocated_modes_run_on_cpu(tmp_path, tiny_model, mode):
    """The engine's sleep/wake/pause paths, as OpenRLHF drives them in these two modes."""
    pairs = write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(4)])
    cmd = tiny_grpo_cmd(tmp_path, tiny_model, pairs, "--reward_plugin", "persrm_rule", "--dataset_plugin",
                        "persrm_rl", *mode)
    rc, log = run_cpu_launcher(cmd, tmp_path)
    assert rc == 0, log[-6000:]
    assert sorted(parse_step_logs(log)) == [1, 2]
