"""``run_eval(cfg)``: read pairs, judge them, score the judgments, write the results.

Outputs in ``cfg.out``: ``metrics.json`` (see :func:`~.metrics.compute_metrics`, plus the
judge's identity, the config and the data), ``metrics.md`` (the printed table),
``judgments.jsonl`` (one line per judgment, model outputs included) and
``accuracy_by_type.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Sequence

from ..judge_format import assign_positions, chat_token_counter
from ..pairs import PairRecord, load_pairs, remove_stale_tmp, write_jsonl
from .config import EvalConfig
from .judges import (BASELINES, ArtefactJudge, ChunkedProgress, Judge, JudgeFailure, MeasureJudge, ModelJudge, Outcome,
                     StylometryJudge, evidence_for)
from .metrics import Judged, compute_metrics, trace_agreement, versus_measure
from .report import markdown_table, plot_by_type

logger = logging.getLogger(__name__)


def spread_over_authors(records: list, limit: int, seed: int) -> list:
    """``limit`` records taken in turn from each author (each author's in seeded order).

    The first rows of a split usually belong to one author; a plain head would evaluate
    one person.
    """
    from collections import defaultdict
    from itertools import zip_longest

    from ..judge_format import position_key

    by_author: dict[str, list] = defaultdict(list)
    for rec in sorted(records, key=lambda r: position_key(r.id, seed)):
        by_author[rec.author].append(rec)
    picked = [r for group in zip_longest(*(by_author[a] for a in sorted(by_author))) for r in group if r is not None]
    return picked[:limit]


def select_pairs(cfg: EvalConfig) -> tuple[list[PairRecord], dict[str, Any]]:
    """The pairs to evaluate (after ``--split`` and ``--limit``) and a description of them.

    A malformed row raises :class:`~openrlhf_persrm.pairs.PairFormatError` naming file and
    line, unless ``--skip_invalid`` (then it is counted in the description).
    """
    records, report = load_pairs(cfg.pairs, skip_invalid=cfg.skip_invalid)
    if report.skipped:
        logger.warning("%s", report)
        for err in report.first_errors:
            logger.warning("  %s", err)
    if cfg.split:
        found = sorted({str(r.extra.get("split")) for r in records})
        records = [r for r in records if r.extra.get("split") == cfg.split]
        if not records:
            raise ValueError(f"--split {cfg.split!r}: no rows of {cfg.pairs} have that 'split'; "
                             f"splits present: {', '.join(found)}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{cfg.pairs}: pair id {dup!r} occurs more than once; ids must be unique to score pairs")
    if cfg.limit_per_type:
        by_type: dict[str, list[PairRecord]] = {}
        for r in records:
            by_type.setdefault(r.negative_type, []).append(r)
        records = [r for t in sorted(by_type) for r in spread_over_authors(by_type[t], cfg.limit_per_type, cfg.seed)]
    if cfg.limit and len(records) > cfg.limit:
        records = spread_over_authors(records, cfg.limit, cfg.seed)
    with open(cfg.pairs, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    data = {"pairs": cfg.pairs, "sha256": sha, "rows_read": report.read, "rows_skipped": report.skipped,
            "split": cfg.split or None, "n_pairs": len(records)}
    return records, data


def judge_evidence(cfg: EvalConfig, model_path: str | None) -> tuple[bool, str]:
    """Whether ``--judge model`` reads evidence, and the scorer it must come from ('' : the rows')."""
    from ..models import evidence_scorer_of

    recorded = evidence_scorer_of(model_path) if model_path else None
    if cfg.evidence == "off":
        return False, ""
    if cfg.evidence == "auto" and recorded is None:
        return False, ""
    return True, cfg.scorer or recorded or ""


def make_judge(cfg: EvalConfig, records: Sequence[PairRecord] = ()) -> Judge:
    """The judge ``cfg`` names; model judges load their backend here (deferred imports)."""
    if cfg.judge == "stylometry":
        return StylometryJudge(ngram=cfg.ngram, weighting=cfg.weighting)
    if cfg.judge == "artefact":
        records, _ = load_pairs(cfg.pairs, skip_invalid=cfg.skip_invalid)
        fit = [r for r in records if r.extra.get("split") == cfg.fit_split]
        if not fit:
            raise ValueError(f"--judge artefact: no rows of {cfg.pairs} have split {cfg.fit_split!r} to fit on; "
                             "set --fit_split to a labelled split of the file (e.g. train)")
        return ArtefactJudge().fit(fit)
    if cfg.judge in ("likelihood", "fluency", "reader", "oracle"):
        scorer = cfg.model if cfg.judge in ("likelihood", "fluency") else cfg.scorer
        return MeasureJudge(kind=cfg.judge, scorer_model=scorer, batch_size=cfg.batch_size)
    if cfg.judge in BASELINES:
        cls = BASELINES[cfg.judge]
        return cls(seed=cfg.seed) if cfg.judge == "random" else cls()
    if cfg.endpoint:
        from ..judges.openai_backend import OpenAIJudge

        served = OpenAIJudge(base_url=cfg.endpoint, model=cfg.model, api_key_env=cfg.api_key_env,
                             concurrency=cfg.concurrency)
        use, scorer = judge_evidence(cfg, None)
        return ModelJudge(ChunkedProgress(served, chunk=4 * cfg.concurrency), label=cfg.model, count_tokens=None,
                          max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                          settings={"backend": "endpoint", "endpoint": served.base_url,
                                    "prompt_budget": "none (the server's context limit applies)"},
                          evidence=evidence_for(records, scorer, batch_size=cfg.batch_size) if use else None)
    from ..judges.local import LocalJudge
    from ..models import resolve_model

    path = resolve_model(cfg.model)
    use, scorer = judge_evidence(cfg, path)
    evidence = evidence_for(records, scorer, batch_size=cfg.batch_size) if use else None
    local = LocalJudge(path, batch_size=cfg.batch_size, dtype=cfg.dtype)
    # In chunks of a few batches: the backend's timeout then bounds one chunk, not the whole evaluation
    # (hundreds of judgments on a slow CPU outlast it), and the progress bar moves chunk by chunk.
    return ModelJudge(ChunkedProgress(local, chunk=4 * cfg.batch_size), label=cfg.model,
                      count_tokens=chat_token_counter(local.tokenizer),
                      max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                      settings={"backend": "local", "path": path, "decoding": "greedy", "dtype": cfg.dtype},
                      evidence=evidence)


def plan_positions(records: Sequence[PairRecord], *, both_orders: bool,
                   seed: int) -> tuple[list[PairRecord], list[str]]:
    """Which judgments to make: each pair at A and B, or once at a balanced, seeded position."""
    if both_orders:
        return [r for r in records for _ in (0, 1)], ["A", "B"] * len(records)
    return list(records), assign_positions([r.id for r in records], seed)


def to_judged(record: PairRecord, position: str, outcome: Outcome) -> Judged:
    if isinstance(outcome, JudgeFailure):
        return Judged(record.id, record.author, record.negative_type, position, None, outcome.kind)
    a, b = outcome
    return Judged(record.id, record.author, record.negative_type, position, (float(a), float(b)))


def judgment_row(j: Judged, **extra: Any) -> dict[str, Any]:
    """One line of ``judgments.jsonl`` (``extra``: e.g. the model's ``output``; :func:`read_judgments` reads
    it back)."""
    return {"id": j.pair_id, "author": j.author, "negative_type": j.negative_type, "real_at": j.real_at,
            "scores": None if j.scores is None else list(j.scores), "verdict": j.verdict, "failure": j.failure,
            **extra}


def read_judgments(path: str | os.PathLike) -> tuple[list[Judged], list[str | None]]:
    """A run's ``judgments.jsonl``: the judgments and each one's model output ("" for a judgment that had
    none, None where the run kept no outputs: a baseline judge)."""
    judged, outputs = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            scores = tuple(row["scores"]) if row.get("scores") else None
            judged.append(Judged(row["id"], row["author"], row["negative_type"], row["real_at"], scores,
                                 row.get("failure")))
            outputs.append((row["output"] or "") if "output" in row else None)
    return judged, outputs


def run_eval(cfg: EvalConfig, *, judge: Judge | None = None, echo: bool = True) -> dict[str, Any]:
    """Evaluate ``cfg.judge`` (or the given ``judge``) on ``cfg.pairs``; returns metrics.json's content."""
    from tqdm import tqdm

    records, data = select_pairs(cfg)
    if not records:
        raise ValueError(f"{cfg.pairs}: no pairs to evaluate")
    judge = judge if judge is not None else make_judge(cfg, records)
    shown, positions = plan_positions(records, both_orders=cfg.both_orders, seed=cfg.seed)
    t0 = time.perf_counter()
    with tqdm(total=len(shown), desc=f"judging ({judge.name})", unit="judgment",
              disable=cfg.judge not in ("model",)) as bar:
        try:
            outcomes = judge.judge(shown, positions, progress=bar)
        finally:
            getattr(judge, "close", lambda: None)()
    seconds = time.perf_counter() - t0
    if len(outcomes) != len(shown):
        raise RuntimeError(f"judge {judge.name!r} returned {len(outcomes)} outcomes for {len(shown)} judgments")
    judged = [to_judged(r, p, o) for r, p, o in zip(shown, positions, outcomes)]

    from .. import __version__

    metrics = compute_metrics(judged, n_resamples=cfg.bootstrap, seed=cfg.seed)
    evidence = getattr(judge, "evidence", None)
    if evidence and cfg.judge == "model":
        from ..evidence.measures import favours

        gain = {(r.id, p): favours(evidence[r.id].arranged(p), "gain")[0] for r, p in zip(shown, positions)}
        metrics["versus_gain"] = versus_measure(judged, gain)
    outputs = getattr(judge, "outputs", None)
    if outputs and cfg.judge == "model":
        from ..judge_format import traced_side

        # does the verdict follow the side the judge's own reasoning names? (evidence traces)
        agreement = trace_agreement(judged, [traced_side(o or "") for o in outputs[:len(judged)]])
        if agreement["judgments"]:
            metrics["trace"] = agreement
    identity = judge.identity()  # after judging: e.g. the model an endpoint turned out to serve
    label = cfg.display_label
    if cfg.endpoint and not (cfg.label or cfg.model):
        label = f"model:{identity.get('model', cfg.endpoint)}"
    metrics = {
        "label": label,
        "judge": identity,
        **metrics,
        "positions": "both orders (each pair at A and at B)" if cfg.both_orders
        else f"one order, balanced A/B (assign_positions, seed {cfg.seed})",
        "data": data,
        "config": asdict(cfg),
        "seconds_judging": round(seconds, 2),
        "version": __version__,
    }
    os.makedirs(cfg.out, exist_ok=True)
    remove_stale_tmp(cfg.out, ("metrics.json", "judgments.jsonl"))  # left by a run killed while writing
    _write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    write_jsonl(os.path.join(cfg.out, "judgments.jsonl"), (
        judgment_row(j, **({"output": outputs[i]} if outputs and i < len(outputs) else {}))
        for i, j in enumerate(judged)))
    table = markdown_table(metrics)
    with open(os.path.join(cfg.out, "metrics.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    plot_by_type([metrics], os.path.join(cfg.out, "accuracy_by_type.png"))
    if echo:
        print(table)
        print(f"wrote {cfg.out}/metrics.json, metrics.md, judgments.jsonl, accuracy_by_type.png")
    return metrics


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)
