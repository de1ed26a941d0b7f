"""Learning check: GRPO in CPU mode raises the mean reward on a toy verifiable task.

The policy is a tiny random Llama; the reward is 1 when its response contains a digit
(``benchmarks/toy_rewards.py``, given to the wrapper as a file plugin). Everything runs
through ``python -m openrlhf_persrm.cli.train_ppo_ray --cpu``: OpenRLHF's own GRPO, rollouts
in the CPU stand-in engine. Prints the per-step curve, writes a PNG, and ends with
``reward_gain=<mean of the last 5 steps minus the first 5>``. Not a timed test.
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
class LearningConfig:
    steps: int = 30
    prompts_per_step: int = 4
    samples_per_prompt: int = 8
    max_new_tokens: int = 12
    lr: float = 2e-3
    out: str = os.path.join(".cache", "bench", "grpo_learning")


def main(cfg: LearningConfig) -> float:
    from _tiny import tiny_causal_lm

    from openrlhf_persrm.compat import parse_step_logs

    os.makedirs(cfg.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="grpo-learning-")
    model = tiny_causal_lm(work, hidden_size=64, num_layers=2, seed=1)
    prompts = os.path.join(work, "prompts.jsonl")
    topics = ["the sea", "a letter", "the war", "a garden", "the city", "an old friend", "winter", "a journey"]
    with open(prompts, "w") as fh:
        for i in range(cfg.steps * cfg.prompts_per_step):
            fh.write(json.dumps({"prompt": f"Write one line about {topics[i % len(topics)]}."}) + "\n")
    cmd = [sys.executable, "-m", "openrlhf_persrm.cli.train_ppo_ray", "--cpu",
           "--reward_plugin", os.path.join(HERE, "toy_rewards.py") + ":ContainsDigit",
           "--data.prompt_dataset", prompts, "--data.input_key", "prompt", "--data.apply_chat_template",
           "--actor.model_name_or_path", model, "--algo.advantage.estimator", "group_norm",
           "--rollout.n_samples_per_prompt", str(cfg.samples_per_prompt),
           "--rollout.batch_size", str(cfg.prompts_per_step), "--rollout.micro_batch_size", "8",
           "--train.batch_size", str(cfg.prompts_per_step * cfg.samples_per_prompt), "--train.micro_batch_size", "8",
           "--rollout.max_new_tokens", str(cfg.max_new_tokens), "--rollout.temperature", "1.0",
           "--data.max_len", "256", "--vllm.num_engines", "1", "--algo.kl.init_coef", "0",
           "--actor.adam.lr", str(cfg.lr), "--actor.lr_warmup_ratio", "0",
           "--train.num_episodes", "1", "--ckpt.output_dir", os.path.join(work, "ckpt")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    with open(os.path.join(cfg.out, "run.log"), "w") as fh:
        fh.write(log)
    if proc.returncode != 0:
        print(log[-5000:])
        raise SystemExit(f"train_ppo_ray failed (exit {proc.returncode}); log in {cfg.out}/run.log")
    steps = parse_step_logs(log)
    curve = [(s, steps[s]["reward"]) for s in sorted(steps)]
    print(f"tiny Llama hidden=64 layers=2, {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples per "
          f"step, {len(curve)} GRPO steps in {seconds:.0f} s (Ray start-up included)")
    print("step  mean_reward")
    for s, r in curve:
        print(f"{s:4d}  {r:.3f}  " + "#" * int(round(r * 40)))
    rewards = [r for _, r in curve]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], rewards, marker="o", lw=1.5)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (response has a digit)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO on CPU (OpenRLHF train_ppo_ray, CPU mode)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.join(cfg.out, "grpo_learning.png")
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")
    print(f"reward_first5={first:.3f}")
    print(f"reward_last5={last:.3f}")
    print(f"reward_gain={last - first:.3f}")
    return last - first


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    for name, default in vars(LearningConfig()).items():
        p.add_argument(f"--{name}", type=type(default), default=default)
    main(LearningConfig(**vars(p.parse_args())))
