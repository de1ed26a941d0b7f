"""Rollout throughput of the CPU engine: batched, one request at a time, and transformers' generate.

Builds a random Llama-like model (nothing downloaded) and generates, greedily and with EOS ignored
(every run does the same work), the same ``--max-tokens`` for the same prompts three ways:

* (a) ``batched``: the engine with ``--samples`` concurrent requests (continuous batching);
* (b) ``one at a time``: the same engine class with ``max_num_seqs=1``;
* (c) ``hf generate``: transformers' own static batched ``generate`` over all samples at once
  (left padding, its default ``DynamicCache``), on a second copy of the same checkpoint.

Decode tokens/s: each mode also runs with one new token (the prefill and its first token), and
decode throughput is ``samples * (max_tokens - 1)`` tokens over the difference in time, so that
prefill (which the engine does once per distinct prompt) does not count; end-to-end tokens/s are
printed too. Times are taken both as wall seconds and as this process's CPU seconds: every mode
computes on one thread, so on an idle machine the two agree, and on a shared one the CPU seconds
still measure the work each mode does while wall seconds swing with the other jobs. The headline
ratios use CPU seconds (wall-second ratios are printed beside them). It ends with ``name=value``
lines: ``vs_hf_generate=<batched / hf generate>`` in decode tokens/s (target >= 1.0: continuous
batching must not lose to static batching) and ``speedup=<batched / one at a time>`` end to end.

    python benchmarks/rollout_engine.py [--samples 8] [--max-tokens 64] [--hidden 256] [--layers 4]
                                        [--heads 8] [--kv-heads 4]

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
    kv_heads: int = 0  # 0: heads // 2, the tests' tiny model
    prompt_words: int = 0  # extra words of context in each prompt (longer prompts: more KV to attend to)
    seed: int = 0
    threads: int = 1  # torch intra-op threads, the same for every mode (CPU seconds assume 1)
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2 (decode is measured past the first token), got {self.max_tokens}")
        for name in ("samples", "prompts", "max_tokens", "hidden", "layers", "heads", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})")
        self.kv_heads = self.kv_heads or max(1, self.heads // 2)
        if self.kv_heads < 0 or self.heads % self.kv_heads:
            raise ValueError(f"--kv-heads ({self.kv_heads}) must divide --heads ({self.heads})")
        if self.prompt_words < 0:
            raise ValueError(f"--prompt-words must be >= 0, got {self.prompt_words}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--samples", type=int, default=defaults.samples, help="concurrent samples")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="distinct prompts")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="tokens per sample")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="model hidden size")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads, help="KV heads (0: heads // 2)")
    parser.add_argument("--prompt-words", type=int, default=defaults.prompt_words, help="extra context words per prompt")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="model seed")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="runs per mode; the fastest counts")
    return parser


def _tiny_module():
    # The test helper builds the tokenizer; load it by path (tests/ is deliberately not a package).
    path = Path(__file__).resolve().parents[1] / "tests" / "_tiny.py"
    spec = importlib.util.spec_from_file_location("_persrm_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_llama(folder: str, cfg: BenchConfig) -> str:
    """tests/_tiny.py's model (its tokenizer, Llama, initializer 0.2) with ``--kv-heads`` KV heads."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_module().train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 2,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=4096, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    path = str(Path(folder) / "random-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class _Clock:
    """Wall seconds and this process's CPU seconds (all threads) since it was made."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _run_engine(engine, prompts, max_tokens: int) -> tuple[tuple[float, float], list[list[int]]]:
    from openrlhf_persrm.cpu.vllm_standin import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    clock = _Clock()
    futures = [engine.submit(p, params) for p in prompts]
    outputs = [f.result()[0].token_ids for f in futures]
    return clock.read(), outputs


def _run_hf(model, prompts, max_tokens: int, pad_id: int) -> tuple[tuple[float, float], list[list[int]]]:
    """transformers' batched greedy ``generate``: one left-padded batch, EOS never stops a row."""
    import torch

    width = max(len(p) for p in prompts)
    clock = _Clock()
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
            min_new_tokens=max_tokens, eos_token_id=None, pad_token_id=pad_id,
        )
    return clock.read(), out[:, width:].tolist()


def main(cfg: BenchConfig) -> dict[str, float]:
    """Run the benchmark, print the report, return the headline ratios."""
    import torch
    from transformers import AutoModelForCausalLM

    from openrlhf_persrm.cpu.engine import BatchedEngine

    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_llama(tmp, cfg)
        batched = BatchedEngine.from_pretrained(path)
        single = BatchedEngine.from_pretrained(path, max_num_seqs=1)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    n_params = sum(p.numel() for p in batched.model.parameters())
    context = " ".join(["I like hiking, cooking and reading science fiction on rainy weekends."] * cfg.prompt_words)
    context = " ".join(context.split()[: cfg.prompt_words])
    texts = [
        f"{context} User {i} likes hiking and short answers. Which response is better, A or B?".strip()
        for i in range(cfg.prompts)
    ]
    prompt_ids = [batched.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompts = [prompt_ids[i % cfg.prompts] for i in range(cfg.samples)]
    pad_id = batched.tokenizer.pad_token_id
    print(
        f"model: LlamaForCausalLM hidden={cfg.hidden} layers={cfg.layers} heads={cfg.heads} "
        f"kv_heads={cfg.kv_heads} vocab={batched.model.config.vocab_size} params={n_params / 1e6:.2f}M float32; "
        f"torch threads={torch.get_num_threads()}"
    )
    print(
        f"workload: {cfg.samples} concurrent samples over {cfg.prompts} prompts of "
        f"{[len(p) for p in prompt_ids]} tokens, {cfg.max_tokens} new tokens each, greedy"
    )
    runners = {
        "batched": lambda n: _run_engine(batched, prompts, n),
        "single": lambda n: _run_engine(single, prompts, n),
        "hf": lambda n: _run_hf(hf_model, prompts, n, pad_id),
    }
    for run in runners.values():  # warm-up: first-call allocations and lazy inits
        run(2)
    # times[mode][kind] -> [(wall, cpu)] per repeat; kind "full" (max_tokens) or "prefill" (1 token).
    times: dict[str, dict[str, list[tuple[float, float]]]] = {m: {"full": [], "prefill": []} for m in runners}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(cfg.repeats):
        for mode, run in runners.items():
            times[mode]["prefill"].append(run(1)[0])
            seconds, outputs[mode] = run(cfg.max_tokens)
            times[mode]["full"].append(seconds)
    batched.shutdown()
    single.shutdown()
    tokens, decode_tokens = cfg.samples * cfg.max_tokens, cfg.samples * (cfg.max_tokens - 1)

    def best(mode: str, kind: str, clock: int) -> float:
        return min(t[clock] for t in times[mode][kind])

    def decode_rate(mode: str, clock: int) -> float:
        return decode_tokens / max(best(mode, "full", clock) - best(mode, "prefill", clock), 1e-9)

    labels = {"batched": "(a) engine, batched", "single": "(b) engine, one at a time", "hf": "(c) hf generate, static batch"}
    for clock, name in ((0, "wall"), (1, "cpu")):
        print(f"tokens per {name} second (fastest of {cfg.repeats}):")
        for mode in runners:
            full, prefill = best(mode, "full", clock), best(mode, "prefill", clock)
            print(
                f"  {labels[mode]:<31} {tokens} tokens in {full:.2f} s = {tokens / full:7.1f}/s end to end; "
                f"decode {decode_rate(mode, clock):7.1f}/s (prefill + first token {prefill:.2f} s)"
            )
    print("all full runs (wall s): " + ", ".join(f"{m} {[round(t[0], 2) for t in times[m]['full']]}" for m in runners))
    print(
        f"same tokens: batched vs one at a time {outputs['batched'] == outputs['single']}, "
        f"batched vs hf generate {outputs['batched'] == outputs['hf']}"
    )
    print(f"vs_hf_generate_wall={decode_rate('batched', 0) / decode_rate('hf', 0):.2f}")
    print(f"speedup_wall={best('single', 'full', 0) / best('batched', 'full', 0):.2f}")
    print(f"batched_decode_tokens_per_cpu_s={decode_rate('batched', 1):.1f}")
    print(f"hf_generate_decode_tokens_per_cpu_s={decode_rate('hf', 1):.1f}")
    result = {
        "vs_hf_generate": decode_rate("batched", 1) / decode_rate("hf", 1),
        "speedup": best("single", "full", 1) / best("batched", "full", 1),
    }
    print(f"vs_hf_generate={result['vs_hf_generate']:.2f}")
    print(f"speedup={result['speedup']:.2f}")
    return result


if __name__ == "__main__":
    args = make_parser().parse_args()
    main(BenchConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()}))
