"""Position consistency after stage-2 GRPO with ``persrm_order_consistency`` against without it.

Two CPU-mode runs of ``python -m openrlhf_persrm.cli.train_ppo_ray --cpu`` (OpenRLHF's own GRPO,
rollouts in the CPU stand-in engine) on the same pairs, steps and seed, both with the
``persrm_rule`` reward and ``persrm_eval`` (greedy, both orders) after the last step; the second
run adds the ``persrm_order_consistency`` trainer plugin. The judge is the tests' tiny judge model
(taught the judge format with mixed verdicts), so the run stays cheap (a few minutes on 2 cores);
the figures show the mechanism, not what a real PersRM gains. Ends with
``consistency_ratio=<with / without>`` (``inf`` when the run without scored 0). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


@dataclass
class BenchConfig:
    pairs: int = 6
    pairs_per_step: int = 2
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    lr: float = 2e-3
    bonus: float = 1.0
    seed: int = 42
    out: str = os.path.join(".cache", "bench", "order_consistency")


def run(cfg: BenchConfig, work: str, model: str, pairs: str, with_plugin: bool) -> dict[int, dict[str, float]]:
    from openrlhf_persrm.compat import parse_step_logs

    steps = cfg.pairs // cfg.pairs_per_step
    plugins = {"persrm_eval": {"pairs": pairs, "eval_steps": steps, "max_new_tokens": cfg.max_new_tokens,
                               "batch_size": 8}}
    if with_plugin:
        plugins["persrm_order_consistency"] = {"bonus": cfg.bonus}
    rows = 2 * cfg.pairs_per_step
    tag = "with" if with_plugin else "without"
    cmd = [sys.executable, "-m", "openrlhf_persrm.cli.train_ppo_ray", "--cpu",
           "--reward_plugin", "persrm_rule", "--dataset_plugin", "persrm_rl", "--data.prompt_dataset", pairs,
           "--trainer_plugin", ",".join(plugins), "--trainer_plugin_config", json.dumps(plugins),
           "--actor.model_name_or_path", model, "--algo.advantage.estimator", "group_norm",
           "--rollout.n_samples_per_prompt", str(cfg.samples_per_prompt), "--rollout.batch_size", str(rows),
           "--rollout.micro_batch_size", "8", "--train.batch_size", str(rows * cfg.samples_per_prompt),
           "--train.micro_batch_size", "8", "--rollout.max_new_tokens", str(cfg.max_new_tokens),
           "--rollout.temperature", "1.0", "--data.max_len", "2048", "--vllm.num_engines", "1",
           "--algo.kl.init_coef", "0", "--actor.adam.lr", str(cfg.lr), "--actor.lr_warmup_ratio", "0",
           "--train.seed", str(cfg.seed), "--train.num_episodes", "1", "--ckpt.save_steps", "-1",
           "--ckpt.output_dir", os.path.join(work, f"ckpt-{tag}"), "--persrm.cache_dir", os.path.join(work, "cache")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    log = proc.stdout + proc.stderr
    with open(os.path.join(cfg.out, f"run-{tag}.log"), "w") as fh:
        fh.write(log)
    if proc.returncode != 0:
        print(log[-5000:])
        raise SystemExit(f"train_ppo_ray ({tag}) failed (exit {proc.returncode}); log in {cfg.out}/run-{tag}.log")
    print(f"run {tag} persrm_order_consistency: {time.perf_counter() - t0:.0f} s")
    return parse_step_logs(log)


def main(cfg: BenchConfig) -> float:
    from _tiny import tiny_judge_lm
    from conftest import judge_prompts, make_pair

    os.makedirs(cfg.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="order-consistency-")
    model = tiny_judge_lm(work, judge_prompts(4), steps=200)
    pairs = os.path.join(work, "pairs.jsonl")
    with open(pairs, "w") as fh:
        for i in range(cfg.pairs):
            fh.write(json.dumps(make_pair(i)) + "\n")
    results = {tag: run(cfg, work, model, pairs, tag == "with") for tag in ("without", "with")}
    last = {tag: steps[max(steps)] for tag, steps in results.items()}
    print("run      step  rollout_consistency  eval_accuracy  eval_consistency  eval_format_failures")
    for tag, steps in results.items():
        for s in sorted(steps):
            logs = steps[s]
            print(f"{tag:8s} {s:4d}  {logs.get('position_consistency', float('nan')):19.3f}  "
                  f"{logs.get('eval_persrm_accuracy', float('nan')):13.3f}  "
                  f"{logs.get('eval_persrm_position_consistency', float('nan')):16.3f}  "
                  f"{logs.get('eval_persrm_format_failure_rate', float('nan')):20.3f}")
    without = last["without"]["eval_persrm_position_consistency"]
    with_ = last["with"]["eval_persrm_position_consistency"]
    # 0 / 0 measured nothing (nan), not an infinite gain
    ratio = with_ / without if without > 0 else (float("inf") if with_ > 0 else float("nan"))
    print(f"consistency_without={without:.3f}")
    print(f"consistency_with={with_:.3f}")
    print(f"consistency_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    for name, default in vars(BenchConfig()).items():
        p.add_argument(f"--{name}", type=type(default), default=default)
    main(BenchConfig(**vars(p.parse_args())))
