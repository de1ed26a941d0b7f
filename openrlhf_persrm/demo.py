"""The built-in demo: SmolLM2-135M-Instruct judges the shipped demo pairs zero-shot.

It exercises the whole judge format on a real model: exemplar budgeting with the model's
own tokenizer, balanced A/B positions, generation, and the strict parser. A 135M model
rarely follows the output contract without training; that is what stages 1 and 2 are for,
and the demo reports it plainly (format failures are counted, never scored as a guess).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from .judge_format import Judgment, parse_judgment, scores_for


def demo_pairs_path() -> str:
    return str(files("openrlhf_persrm") / "data" / "demo_pairs.jsonl")


@dataclass
class DemoConfig:
    """Settings of ``persrm demo`` (each has a flag of the same name)."""

    pairs: str = ""
    model: str = "smollm2-135m-instruct"
    limit: int = 12
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 256
    batch_size: int = 4
    seed: int = 0
    out: str = os.path.join(".cache", "demo")

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"--limit {self.limit}: must be at least 1")
        if self.max_prompt_tokens < 256:
            raise ValueError(f"--max_prompt_tokens {self.max_prompt_tokens}: too small for a judge prompt; use >= 256")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Judge the demo pairs through ``persrm eval``'s model judge; print each verdict and the accuracy."""
    from .eval.config import EvalConfig
    from .eval.run import run_eval

    metrics = run_eval(EvalConfig(
        pairs=cfg.pairs or demo_pairs_path(), judge="model", model=cfg.model, out=cfg.out, limit=cfg.limit,
        max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        seed=cfg.seed, label=f"{cfg.model} (zero-shot)"), echo=False)
    with open(os.path.join(cfg.out, "judgments.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    for row in rows:
        row["lenient_verdict"] = lenient_verdict(row["output"] or "", row["real_at"])
    n = len(rows)
    summary = {
        "model": cfg.model, "pairs": n, "seconds": metrics["seconds_judging"],
        "accuracy": metrics["overall"]["accuracy"],
        "format_failure_rate": metrics["format_failure_rate"],
        "lenient_accuracy": sum(r["lenient_verdict"] == "correct" for r in rows) / n if n else 0.0,
    }
    print_table(rows, summary, cfg.out)
    return summary


def lenient_verdict(text: str, real_at: str) -> str:
    """The verdict when a bare ``<answer>`` without reasoning is read too (the demo's second figure)."""
    result = parse_judgment(text, require_reasoning=False)
    if not isinstance(result, Judgment):
        return f"format failure ({result.kind.value})"
    real, other = scores_for(result, real_at)
    return "correct" if real > other else ("tie" if real == other else "wrong")


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], out: str) -> None:
    print()
    print(f"| {'pair':<22} | {'author':<20} | {'negative':<17} | real | scores  | verdict")
    print(f"|{'-' * 24}|{'-' * 22}|{'-' * 19}|------|---------|{'-' * 30}")
    for r in rows:
        scores = "-" if r["scores"] is None else f"[{r['scores'][0]:g}, {r['scores'][1]:g}]"
        verdict = r["verdict"] if r["verdict"] != "failure" else f"format failure ({r['failure']})"
        print(f"| {r['id'][:22]:<22} | {r['author'][:20]:<20} | {r['negative_type'][:17]:<17} | {r['real_at']:^4} "
              f"| {scores:<7} | {verdict}")
    print()
    print(f"accuracy (strict format, failures count as wrong): {summary['accuracy']:.2f}")
    print(f"accuracy reading a bare <answer> too:               {summary['lenient_accuracy']:.2f}")
    print(f"format-failure rate:                                {summary['format_failure_rate']:.2f}")
    print(f"{summary['pairs']} pairs in {summary['seconds']} s; outputs in {out}/judgments.jsonl, metrics in {out}/metrics.json")
