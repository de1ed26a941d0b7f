"""Cost of the persrm_rule reward per call on a 1,000-token judge output, outside any model.

Measures the function OpenRLHF actually calls (``reward_func`` of the entry file given as
``--reward.remote_url``: parsing, label handling, tensor conversion) one sample per call,
as OpenRLHF calls it, and in the same run the plugin alone and the entry's tensor conversion
against the former one (a tensor per ``extra_logs`` key). Rounds alternate between the variants
and each figure is the median of its rounds, so a busy machine slows all of them alike; compare
the ratios. Headline: ``us_per_call`` (target < 100).

    python benchmarks/reward_overhead.py [--calls 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def judge_output(n_tokens: int, count) -> str:
    rng = random.Random(0)
    words = ("the exemplars show long periodic sentences with semicolons and an ironic distance; response A "
             "keeps that cadence while response B breaks into short exclamations").split()
    body: list[str] = []
    text = ""
    while count(text) < n_tokens:
        body.extend(rng.choice(words) for _ in range(20))
        text = "<think>\n" + " ".join(body) + "\n</think>\n<answer>[8, 3]</answer><|im_end|>"
    return text


def per_key_tensors(out: Any, keys: tuple[str, ...], error: float) -> dict:
    """The entry's former conversion, kept here as the reference: one tensor per key."""
    import torch

    n = len(out.rewards)
    extra = {k: torch.tensor(out.extra_logs.get(k, [0.0] * n), dtype=torch.float32) for k in keys}
    extra["plugin_error"] = torch.full((n,), error)
    return {"rewards": torch.tensor(out.rewards, dtype=torch.float32),
            "scores": torch.tensor(out.scores, dtype=torch.float32), "extra_logs": extra}


def us_per_call(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from openrlhf_persrm.cli.train_ppo_ray import reward_entry_file

    try:
        from openrlhf_persrm.models import load_smollm2_tokenizer

        tok = load_smollm2_tokenizer()
        count, counted_with = (lambda t: len(tok(t)["input_ids"])), "SmolLM2 tokenizer"
    except Exception:
        count, counted_with = (lambda t: int(len(t.split()) * 1.3)), "1.3 tokens/word estimate"

    spec = importlib.util.spec_from_file_location("reward_func", reward_entry_file())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # exactly as OpenRLHF 0.11.2 loads --reward.remote_url files

    prompt = "<|im_start|>system\n...judge prompt...<|im_end|>\n<|im_start|>assistant\n"
    response = judge_output(1000, count)
    query, label = prompt + response, {"chosen_position": "A", "pair_id": "p1"}
    n_tokens = count(response)
    plugin = module._PLUGIN
    out = plugin([query], [prompt], [label])
    keys = tuple(out.extra_logs)

    variants = {
        "entry": lambda: module.reward_func([query], [prompt], [label]),
        "plugin": lambda: plugin([query], [prompt], [label]),
        "one_tensor": lambda: module.as_tensors(out, keys, 0.0),
        "per_key": lambda: per_key_tensors(out, keys, 0.0),
    }
    result = module.reward_func([query], [prompt], [label])
    assert result["rewards"].tolist() == [1.0]
    reference = per_key_tensors(out, keys, 0.0)
    assert {k: v.tolist() for k, v in result["extra_logs"].items()} == \
        {k: v.tolist() for k, v in reference["extra_logs"].items()}  # the same answer, cheaper
    for fn in variants.values():  # warm-up
        us_per_call(fn, min(200, args.calls))
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            rounds[name].append(us_per_call(fn, args.calls))
    us = {name: statistics.median(values) for name, values in rounds.items()}

    print(f"judge_output_tokens={n_tokens} ({counted_with}), chars={len(response)}, "
          f"calls={args.calls} x {args.rounds} rounds per variant, extra_logs keys={len(keys) + 1}")
    print(f"plugin_only_us_per_call={us['plugin']:.1f}")
    print(f"entry_overhead_us={us['entry'] - us['plugin']:.1f}")
    print(f"conversion_us_one_tensor={us['one_tensor']:.1f}")
    print(f"conversion_us_per_key_former={us['per_key']:.1f}")
    print(f"conversion_speedup={us['per_key'] / us['one_tensor']:.2f}")
    print(f"us_per_call_over_target={us['entry'] / 100:.2f}")
    print(f"us_per_call={us['entry']:.1f}")


if __name__ == "__main__":
    main()
