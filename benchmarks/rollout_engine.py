"""Rollout throughput of the CPU engine: batched decoding against one request at a time.

Builds a random Llama-like model (nothing downloaded), submits the same concurrent samples to
two engines that differ only in ``max_num_seqs`` (the batch limit, 1 = one at a time), and
prints tokens/s for each and ``speedup=<batched / one-at-a-time>`` last.

    python benchmarks/rollout_engine.py [--samples 8] [--max-tokens 64] [--hidden 256] [--layers 4]

Each mode runs ``--repeats`` times, interleaved, and the fastest run counts: on a shared machine
the minimum is the least disturbed measurement. ``--threads`` defaults to 1 because that is what a
rollout actor gets under Ray (``OMP_NUM_THREADS`` follows the actor's ``num_cpus``, which
OpenRLHF sets to 1 or 0.2); on tiny matmuls a second intra-op thread mostly adds sync cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchConfig:
    """What to measure; the defaults are small enough for a 2-core machine (about a minute)."""

    samples: int = 8  # concurrent requests, each one sample (as OpenRLHF's rollout actor sends them)
    prompts: int = 2  # distinct prompts the samples are spread over
    max_tokens: int = 64  # tokens generated per sample (EOS ignored, so every run does the same work)
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    seed: int = 0
    threads: int = 1  # torch intra-op threads, the same for both modes
    repeats: int = 3

    def __post_init__(self) -> None:
        for name in ("samples", "prompts", "max_tokens", "hidden", "layers", "heads", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--samples", type=int, default=defaults.samples, help="concurrent samples")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="distinct prompts")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="tokens per sample")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="model hidden size")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="attention heads")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="model and sampling seed")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="runs per mode; the fastest counts")
    return parser


def _tiny_module():
    # The test helper builds the model; load it by path (tests/ is deliberately not a package).
    path = Path(__file__).resolve().parents[1] / "tests" / "_tiny.py"
    spec = importlib.util.spec_from_file_location("_persrm_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(engine, prompts, params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    futures = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    outputs = [f.result()[0].token_ids for f in futures]
    return time.perf_counter() - start, outputs


def main(cfg: BenchConfig) -> float:
    """Run the benchmark, print the report, return the speedup."""
    import torch

    from openrlhf_persrm.cpu.engine import BatchedEngine
    from openrlhf_persrm.cpu.vllm_standin import SamplingParams

    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiny_module().tiny_causal_lm(
            tmp, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads, seed=cfg.seed
        )
        batched = BatchedEngine.from_pretrained(path)
        single = BatchedEngine.from_pretrained(path, max_num_seqs=1)
    n_params = sum(p.numel() for p in batched.model.parameters())
    texts = [f"User {i} likes hiking and short answers. Which response is better, A or B?" for i in range(cfg.prompts)]
    prompt_ids = [batched.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompts = [prompt_ids[i % cfg.prompts] for i in range(cfg.samples)]
    # Seeded per-sample sampling: both engines must then produce identical tokens.
    params = [
        SamplingParams(temperature=1.0, max_tokens=cfg.max_tokens, ignore_eos=True, seed=cfg.seed + i)
        for i in range(cfg.samples)
    ]
    print(
        f"model: LlamaForCausalLM hidden={cfg.hidden} layers={cfg.layers} heads={cfg.heads} "
        f"vocab={batched.model.config.vocab_size} params={n_params / 1e6:.2f}M float32; "
        f"torch threads={torch.get_num_threads()}"
    )
    print(
        f"workload: {cfg.samples} concurrent samples over {cfg.prompts} prompts of "
        f"{[len(p) for p in prompt_ids]} tokens, {cfg.max_tokens} new tokens each"
    )
    for engine in (batched, single):  # warm-up: first-call allocations and lazy inits
        _run(engine, prompts[:2], params[:2])
    runs: dict[str, list[float]] = {"single": [], "batched": []}
    for _ in range(cfg.repeats):
        seconds, out_single = _run(single, prompts, params)
        runs["single"].append(seconds)
        seconds, out_batched = _run(batched, prompts, params)
        runs["batched"].append(seconds)
    t_single, t_batched = min(runs["single"]), min(runs["batched"])
    batched.shutdown()
    single.shutdown()
    tokens = cfg.samples * cfg.max_tokens
    print(f"one request at a time: {tokens} tokens in {t_single:.2f} s = {tokens / t_single:.1f} tokens/s")
    print(f"batched:               {tokens} tokens in {t_batched:.2f} s = {tokens / t_batched:.1f} tokens/s")
    print(f"all runs (s): one at a time {[round(t, 2) for t in runs['single']]}, batched {[round(t, 2) for t in runs['batched']]}")
    print(f"same tokens in both modes: {out_single == out_batched}")
    speedup = t_single / t_batched
    print(f"speedup={speedup:.2f}")
    return speedup


if __name__ == "__main__":
    args = make_parser().parse_args()
    main(BenchConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()}))
