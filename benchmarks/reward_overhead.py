"""Cost of the persrm_rule reward per call on a 1,000-token judge output, outside any model.

Measures the function OpenRLHF actually calls (``reward_func`` of the entry file given as
``--reward.remote_url``: parsing, label handling, tensor conversion) one sample per call,
as OpenRLHF calls it. Headline: ``us_per_call`` (target < 100).
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import time

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


def main() -> None:
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

    for _ in range(200):  # warm-up
        module.reward_func([query], [prompt], [label])
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        out = module.reward_func([query], [prompt], [label])
    entry_us = (time.perf_counter() - t0) / n * 1e6
    assert out["rewards"].tolist() == [1.0]

    plugin = module._PLUGIN
    t0 = time.perf_counter()
    for _ in range(n):
        plugin([query], [prompt], [label])
    plugin_us = (time.perf_counter() - t0) / n * 1e6

    print(f"judge_output_tokens={n_tokens} ({counted_with}), chars={len(response)}, calls={n}")
    print(f"plugin_only_us_per_call={plugin_us:.1f}")
    print(f"us_per_call={entry_us:.1f}")


if __name__ == "__main__":
    main()
