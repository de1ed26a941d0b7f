"""Shared fixtures. Tests run with ``--import-mode=importlib`` (the openrlhf wheel installs a
top-level ``tests`` package), so this folder is put on ``sys.path`` for helper modules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def make_pair(i: int = 0, **overrides) -> dict:
    row = {
        "id": f"pair-{i}",
        "author": "jane_austen" if i % 2 == 0 else "herman_melville",
        "exemplars": [
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.",
            "She was the youngest of the two daughters of a most affectionate, indulgent father.",
        ],
        "prompt": "The morning was fine, and Elinor walked out early.",
        "chosen": "She had not gone far before she perceived, with no small degree of vexation, that she was observed.",
        "rejected": "She had not gone far before she noticed, with no little degree of annoyance, that she was watched.",
        "negative_type": "minor_replacement",
    }
    row.update(overrides)
    return row


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from _tiny import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(6)])


@pytest.fixture
def sft_file(tmp_path) -> Path:
    rows = []
    for i in range(16):
        pos = "A" if i % 2 == 0 else "B"
        rows.append(make_pair(i, trace={
            "reasoning": "The exemplars are measured and ironic, with long periodic sentences. "
                         "The real continuation keeps that register; the other swaps in plainer words.",
            "chosen_position": pos, "scores": [8, 4] if pos == "A" else [4, 8], "source": "test"}))
    return write_rows(tmp_path / "sft.jsonl", rows)


def judge_prompts(n_pairs: int) -> list:
    """Judge-format prompts for the first ``n_pairs`` test pairs, in both A/B orders, plus one with
    random-word candidates per pair."""
    from openrlhf_persrm.judge_format import arrange, build_messages

    import random

    rng = random.Random(0)
    words = "the a sea of letter morning and I was it light grey".split()
    out = []
    for i in range(n_pairs):
        p = make_pair(i)
        for pos in ("A", "B"):
            out.append(build_messages(p["exemplars"], p["prompt"], *arrange(p["chosen"], p["rejected"], pos)))
        # Candidates of random words too (a policy's samples look like that), so the judge's
        # output format does not hinge on seeing these particular texts.
        noise = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(2)]
        out.append(build_messages(p["exemplars"], p["prompt"], *noise))
    return out


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory) -> str:
    """A tiny model taught to answer judge prompts in the judge format (mixed verdicts)."""
    from _tiny import tiny_judge_lm

    return tiny_judge_lm(tmp_path_factory.mktemp("judge"), judge_prompts(4), steps=200)


def tiny_grpo_cmd(tmp_path: Path, model: str, prompts: Path, *flags: str) -> list[str]:
    """``train_ppo_ray --cpu`` for two small GRPO steps (4 prompts x 4 samples); ``flags`` add or override."""
    import sys

    return [sys.executable, "-m", "openrlhf_persrm.cli.train_ppo_ray", "--cpu",
            "--data.prompt_dataset", str(prompts), "--actor.model_name_or_path", model,
            "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
            "--rollout.batch_size", "2", "--rollout.micro_batch_size", "4", "--train.batch_size", "8",
            "--train.micro_batch_size", "4", "--rollout.max_new_tokens", "16", "--data.max_len", "2048",
            "--vllm.num_engines", "1", "--data.max_samples", "4", "--algo.kl.init_coef", "0",
            "--ckpt.output_dir", str(tmp_path / "ckpt"), "--persrm.cache_dir", str(tmp_path / "cache"), *flags]


def run_cpu_launcher(cmd: list[str], cwd: Path, **env: str):
    """Run a wrapper command to completion; returns ``(returncode, stdout + stderr)``."""
    import subprocess

    full_env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), **env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd, env=full_env)
    return proc.returncode, proc.stdout + proc.stderr
