"""Trainer plugins through the real launchers in CPU mode (tiny models): OpenRLHF's unmodified
train_ppo_ray and train_sft, with the hooks installed from openrlhf_persrm.compat."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import HERE, make_pair, run_cpu_launcher, tiny_grpo_cmd, write_rows

from openrlhf_persrm.compat import parse_step_logs

EVAL_KEYS = ("eval_persrm_accuracy", "eval_persrm_position_consistency", "eval_persrm_format_failure_rate")


def _best_step(steps):
    """The first step with the highest validation accuracy (OpenRLHF keeps a strictly better one)."""
    best = max(logs["eval_persrm_accuracy"] for logs in steps.values())
    return min(s for s, logs in steps.items() if logs["eval_persrm_accuracy"] == best)


@pytest.mark.slow
def test_stage2_with_order_consistency_eval_and_a_third_party_plugin(tmp_path, tiny_judge):
    pairs = write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(4)])
    val = write_rows(tmp_path / "val.jsonl", [make_pair(i, id=f"val-{i}") for i in range(2)])
    config = {"persrm_order_consistency": {"bonus": 0.5},
              "persrm_eval": {"pairs": "val.jsonl", "eval_steps": 1, "max_new_tokens": 24, "batch_size": 4},
              "example_short_bonus": {"bonus": 0.1}}
    cmd = tiny_grpo_cmd(tmp_path, tiny_judge, pairs, "--reward_plugin", "persrm_rule", "--dataset_plugin", "persrm_rl",
                        "--trainer_plugin", "persrm_order_consistency,persrm_eval,example_short_bonus",
                        "--trainer_plugin_config", json.dumps(config), "--rollout.max_new_tokens", "24",
                        "--rollout.temperature", "0.8", "--actor.adam.lr", "1e-3",
                        "--ckpt.path", str(tmp_path / "ckpts"), "--ckpt.save_steps", "-1")
    assert val.exists()
    rc, log = run_cpu_launcher(cmd, tmp_path)
    assert rc == 0, log[-6000:]
    steps = parse_step_logs(log)
    assert sorted(steps) == [1, 2], log[-3000:]
    for logs in steps.values():
        assert logs["twins_in_step"] == 1.0  # both orders of each pair in the same step
        assert 0.0 <= logs["position_consistency"] <= 1.0
        assert logs["example_groups"] == 2.0  # the third-party plugin, from its entry point, saw both groups
        for key in EVAL_KEYS:
            assert 0.0 <= logs[key] <= 1.0, (key, logs)
    best = _best_step(steps)
    kept = sorted(p.name for p in (tmp_path / "ckpts" / "_actor").glob("best_global_step*"))
    assert kept == [f"best_global_step{best}"], (kept, steps)


@pytest.mark.slow
def test_policy_grpo_with_group_rewards_from_a_judge_that_prefers_the_longer_sample(tmp_path, tiny_model):
    pairs = write_rows(tmp_path / "pairs.jsonl",
                       [make_pair(i, prompt=f"Morning {i}: Elinor walked out early.") for i in range(4)])
    # The stub judge prefers the longer candidate (7 to 4; a tie 5 to 5): with all_pairs and both orders the
    # longest sample of a group wins every comparison, the shortest loses every one.
    recorder = f"{HERE / '_reward_recorder.py'}:RewardRecorder"
    config = {"persrm_group": {"backend": f"{HERE / '_judge_stubs.py'}:StubJudge",
                               "backend_config": {"rule": "longer"}, "strategy": "all_pairs", "parse_retries": 0},
              recorder: {"path": str(tmp_path / "rewards.jsonl")}}
    cmd = tiny_grpo_cmd(tmp_path, tiny_model, pairs, "--dataset_plugin", "persrm_policy",
                        "--trainer_plugin", f"persrm_group,{recorder}", "--trainer_plugin_config", json.dumps(config),
                        "--data.max_len", "1024", "--rollout.temperature", "1.0")
    rc, log = run_cpu_launcher(cmd, tmp_path)
    assert rc == 0, log[-6000:]
    assert "persrm_group sets the rewards" in log
    steps = parse_step_logs(log)
    assert sorted(steps) == [1, 2], log[-3000:]
    for logs in steps.values():
        assert logs["group_judgments"] == 2 * 2 * 6  # 2 prompts x all 6 pairs of 4 samples x both orders
        assert logs["group_judge_failed"] == 0.0
        assert logs["reward"] == pytest.approx(0.0, abs=1e-6)  # all_pairs margins cancel within each group
    rows = [json.loads(line) for line in (tmp_path / "rewards.jsonl").read_text().splitlines()]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["step"], row["group"]), []).append(row)
    assert len(groups) == 4 and all(len(g) == 4 for g in groups.values()), groups
    exact = 0
    for group in groups.values():
        rewards = [r["reward"] for r in group]
        assert min(rewards) < 0 < max(rewards), group  # the judge's verdicts differ: some win, some lose
        if any("<" in r["response"] for r in group):
            continue  # tags and markers are neutralised before judging, which changes the lengths it compares
        # without them the judge compares the responses stripped of trailing whitespace: each comparison is a
        # margin of 3/9 in both orders, so a sample's reward is (members it is longer than - those longer) / 9
        seen = [len(r["response"].rstrip()) for r in group]
        for r, n in zip(group, seen):
            assert r["reward"] == pytest.approx((sum(n > m for m in seen) - sum(n < m for m in seen)) / 9), group
        exact += 1
    assert exact >= 1, groups
    # OpenRLHF's own view of the same rewards: they spread, so the step health check stays quiet
    assert "every prompt group got identical rewards" not in log


@pytest.mark.slow
def test_sft_with_eval_logs_and_keeps_the_best_checkpoint(tmp_path, tiny_model, sft_file):
    val = write_rows(tmp_path / "val.jsonl", [make_pair(i, id=f"val-{i}") for i in range(2)])
    ckpt = tmp_path / "ckpts"
    cmd = [sys.executable, "-m", "openrlhf_persrm.cli.train_sft", "--cpu", "--dataset_plugin", "persrm_sft",
           "--data.dataset", str(sft_file), "--model.model_name_or_path", tiny_model,
           "--ckpt.output_dir", str(tmp_path / "out"), "--ckpt.path", str(ckpt), "--data.max_len", "2048",
           "--train.batch_size", "4", "--train.micro_batch_size", "2", "--train.max_epochs", "1",
           "--ds.param_dtype", "bf16", "--persrm.cache_dir", str(tmp_path / "cache"),
           "--logger.tensorboard_dir", str(tmp_path / "tb"),
           "--trainer_plugin", "persrm_eval", "--trainer_plugin_config",
           json.dumps({"pairs": str(val), "eval_steps": 1, "max_new_tokens": 8, "batch_size": 4})]
    rc, log = run_cpu_launcher(cmd, tmp_path)
    assert rc == 0, log[-6000:]
    steps = {s: logs for s, logs in parse_step_logs(log).items()}
    assert sorted(steps) == [1, 2, 3, 4], log[-3000:]
    for logs in steps.values():
        assert "gpt_loss" in logs
        for key in EVAL_KEYS:
            assert 0.0 <= logs[key] <= 1.0, (key, logs)
    best = json.loads((ckpt / "best_checkpoint.json").read_text())
    assert best["global_step"] == _best_step(steps) and best["metric"] == "eval_persrm_accuracy"
    assert sorted(p.name for p in ckpt.glob("best_global_step*")) == [f"best_global_step{best['global_step']}_hf"]
    assert (ckpt / f"best_global_step{best['global_step']}_hf" / "config.json").exists()
    # through OpenRLHF's own TensorBoard logging
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = [p for p in (tmp_path / "tb").iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert "train/eval_persrm_accuracy" in acc.Tags()["scalars"]
    assert re.search(r"\[persrm\] Global step 1: ", log)
