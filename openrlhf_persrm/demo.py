"""The built-in demo: SmolLM2-135M-Instruct judges the shipped demo pairs zero-shot.

It exercises the whole judge format on a real model: exemplar budgeting with the model's
own tokenizer, balanced A/B positions, generation, and the strict parser. A 135M model
rarely follows the output contract without training; that is what stages 1 and 2 are for,
and the demo reports it plainly (format failures are counted, never scored as a guess).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from .judge_format import (ExemplarBudget, Judgment, PromptTooLong, arrange, assign_positions, chat_token_counter,
                           parse_judgment, scores_for)
from .pairs import load_pairs

logger = logging.getLogger(__name__)


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


def verdict(result: Any, chosen_position: str) -> str:
    if not isinstance(result, Judgment):
        return f"format failure ({result.kind.value})"
    real, other = scores_for(result, chosen_position)
    return "correct" if real > other else ("tie" if real == other else "wrong")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from .contracts import JudgeRequest
    from .judges.local import LocalJudge
    from .models import resolve_model

    records, report = load_pairs(cfg.pairs or demo_pairs_path())
    records = records[: cfg.limit]
    model_path = resolve_model(cfg.model)
    judge = LocalJudge(model_path, batch_size=cfg.batch_size)
    count = chat_token_counter(judge.tokenizer)
    positions = assign_positions([r.id for r in records], cfg.seed)
    requests, kept = [], []
    for rec, pos in zip(records, positions):
        a, b = arrange(rec.chosen, rec.rejected, pos)
        try:
            fitted = ExemplarBudget(cfg.max_prompt_tokens).fit(count, rec.exemplars, rec.prompt, a, b)
        except PromptTooLong as exc:
            logger.warning("pair %s skipped: %s", rec.id, exc)
            continue
        requests.append(JudgeRequest(fitted.messages, max_new_tokens=cfg.max_new_tokens))
        kept.append((rec, pos))
    print(f"Judging {len(requests)} demo pairs with {cfg.model} (zero-shot, greedy, "
          f"{cfg.max_new_tokens} new tokens max) ...", flush=True)
    t0 = time.perf_counter()
    with tqdm(total=len(requests), desc="judging", unit="pair") as bar:
        outputs = judge.generate(requests, progress=bar)
    seconds = time.perf_counter() - t0

    rows, verdicts = [], Counter()
    for (rec, pos), text in zip(kept, outputs):
        strict = parse_judgment(text)
        lenient = parse_judgment(text, require_reasoning=False)
        v = verdict(strict, pos)
        verdicts[v if not v.startswith("format") else "format failure"] += 1
        rows.append({"id": rec.id, "author": rec.author, "negative_type": rec.negative_type, "real_at": pos,
                     "scores": None if not isinstance(lenient, Judgment) else [lenient.score_a, lenient.score_b],
                     "verdict": v, "lenient_verdict": verdict(lenient, pos), "output": text})
    n = len(rows)
    summary = {
        "model": cfg.model, "pairs": n, "seconds": round(seconds, 1),
        "accuracy": verdicts["correct"] / n if n else 0.0,
        "format_failure_rate": verdicts["format failure"] / n if n else 0.0,
        "lenient_accuracy": sum(r["lenient_verdict"] == "correct" for r in rows) / n if n else 0.0,
        "verdicts": dict(verdicts),
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "judgments.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(cfg.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    print_table(rows, summary, cfg.out)
    return summary


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], out: str) -> None:
    print()
    print(f"| {'pair':<22} | {'author':<20} | {'negative':<17} | real | scores  | verdict")
    print(f"|{'-' * 24}|{'-' * 22}|{'-' * 19}|------|---------|{'-' * 30}")
    for r in rows:
        scores = "-" if r["scores"] is None else f"[{r['scores'][0]}, {r['scores'][1]}]"
        print(f"| {r['id'][:22]:<22} | {r['author'][:20]:<20} | {r['negative_type'][:17]:<17} | {r['real_at']:^4} "
              f"| {scores:<7} | {r['verdict']}")
    print()
    print(f"accuracy (strict format, failures count as wrong): {summary['accuracy']:.2f}")
    print(f"accuracy reading a bare <answer> too:               {summary['lenient_accuracy']:.2f}")
    print(f"format-failure rate:                                {summary['format_failure_rate']:.2f}")
    print(f"{summary['pairs']} pairs in {summary['seconds']} s; outputs in {out}/judgments.jsonl")
