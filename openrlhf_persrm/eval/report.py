"""Markdown tables and plots of eval metrics, for one judge or several side by side.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch), imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(ci: Sequence[float]) -> str:
    lo, hi = ci
    return "-" if math.isnan(lo) else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(metrics: dict[str, Any]) -> str:
    """One judge's metrics as Markdown: overall, by negative type, by author (percentages)."""
    has_cons = metrics.get("consistency") is not None
    head = ["group", "pairs", "accuracy %", "95% CI", "format failures %", "ties %"]
    if has_cons:
        head.append("consistency %")
    lines = [f"**{metrics.get('label', 'judge')}** on `{metrics.get('data', {}).get('pairs', '?')}`"
             + (f" (split {metrics['data']['split']})" if metrics.get("data", {}).get("split") else "")
             + (", both orders" if has_cons else ""), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def row(name: str, m: dict[str, Any]) -> None:
        cells = [name, str(m["n"]), _pct(m["accuracy"]), _ci(m["ci95"]), _pct(m["format_failure_rate"]),
                 _pct(m["tie_rate"])]
        if has_cons:
            cells.append(_pct(m.get("consistency")))
        lines.append("| " + " | ".join(cells) + " |")

    row("**overall**", metrics["overall"])
    for name, m in metrics["by_type"].items():
        row(f"type: {name}", m)
    for name, m in metrics["by_author"].items():
        row(f"author: {name}", m)
    kinds = metrics.get("failure_kinds") or {}
    if kinds:
        lines += ["", "Format failures by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items())]
    return "\n".join(lines) + "\n"


def compare_table(runs: Sequence[dict[str, Any]]) -> str:
    """Several judges side by side: accuracy % [95% CI] overall and per negative type, then the share of
    judgments that were ties and format failures."""
    types = sorted({t for m in runs for t in m["by_type"]})
    has_cons = any(m.get("consistency") is not None for m in runs)
    # Ties beside accuracy: a tie counts as wrong, so a low accuracy may be a judge that cannot separate
    # the two texts (ties) rather than one that prefers the negative.
    head = ["judge", "overall"] + types + ["ties %", "format failures %"] + (["consistency %"] if has_cons else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in runs:
        def cell(s: dict[str, Any] | None) -> str:
            return "-" if s is None else f"{_pct(s['accuracy'])} {_ci(s['ci95'])}"
        cells = [m.get("label", "?"), cell(m["overall"])] + [cell(m["by_type"].get(t)) for t in types]
        cells.append(_pct(m["overall"].get("tie_rate")))
        cells.append(_pct(m["format_failure_rate"]))
        if has_cons:
            cons = m.get("consistency")
            cells.append(_pct(cons["rate"]) if cons else "-")
        lines.append("| " + " | ".join(cells) + " |")
    n = {m["overall"]["n"] for m in runs}
    lines += ["", "Accuracy in % with percentile-bootstrap 95% intervals over pairs; "
              f"pairs per judge: {', '.join(str(x) for x in sorted(n))}."]
    return "\n".join(lines) + "\n"


def plot_by_type(runs: Sequence[dict[str, Any]], out_png: str, *, title: str | None = None) -> str:
    """Bar chart of accuracy per negative type (and overall), one bar per judge, 95% CI bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types = sorted({t for m in runs for t in m["by_type"]})
    groups = ["overall"] + types
    width = 0.8 / max(1, len(runs))
    fig = Figure(figsize=(max(5.0, 1.2 + 1.6 * len(groups) * max(1, len(runs)) ** 0.5), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, m in enumerate(runs):
        stats = [m["overall"]] + [m["by_type"].get(t) for t in types]
        xs, ys, lo, hi = [], [], [], []
        for g, s in enumerate(stats):
            if s is None:
                continue
            xs.append(g - 0.4 + width * (k + 0.5))
            ys.append(s["accuracy"])
            lo.append(max(0.0, s["accuracy"] - s["ci95"][0]))
            hi.append(max(0.0, s["ci95"][1] - s["accuracy"]))
        bars = ax.bar(xs, ys, width * 0.92, yerr=[lo, hi], capsize=3, label=m.get("label", f"judge {k + 1}"),
                      error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for bar, y in zip(bars, ys):
            ax.annotate(f"{100 * y:.0f}", (bar.get_x() + bar.get_width() / 2, 0.02), ha="center", va="bottom",
                        fontsize=7, color="white" if y > 0.1 else "#333333")
    chance = ax.axhline(0.5, color="#888888", linestyle="--", linewidth=1, label="chance (0.5)")
    counts = {t: m["by_type"][t]["n"] for m in runs for t in m["by_type"]}
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n={runs[0]['overall']['n'] if g == 'overall' else counts[g]})" for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pairwise accuracy (95% CI)")
    ax.set_title(title or ("Accuracy by negative type" if len(runs) > 1 else
                           f"{runs[0].get('label', 'judge')}: accuracy by negative type"), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if len(runs) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    else:  # one judge: the title names it; the legend only explains the dashed line
        ax.legend(handles=[chance], fontsize=8, loc="upper right", frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return out_png


def compare(metrics_paths: Sequence[str], out_png: str, out_md: str, *,
            labels: Sequence[str] | None = None) -> str:
    """Put several judges' ``metrics.json`` side by side: a grouped bar plot and a Markdown table.

    Returns the Markdown. ``labels`` override the labels stored in the files (same order).
    Judges evaluated on different pair sets are compared anyway, but the table lists the
    pair counts so that shows.
    """
    if not metrics_paths:
        raise ValueError("compare needs at least one metrics.json")
    if labels is not None and len(labels) != len(metrics_paths):
        raise ValueError(f"{len(labels)} labels for {len(metrics_paths)} metrics files")
    runs = []
    for i, path in enumerate(metrics_paths):
        try:
            with open(path, encoding="utf-8") as fh:
                m = json.load(fh)
        except (ValueError, RecursionError) as exc:  # bad JSON or not UTF-8
            raise ValueError(f"{path}: not a persrm eval metrics.json ({exc})") from None
        if not isinstance(m, dict) or not {"overall", "by_type"} <= m.keys():
            raise ValueError(f"{path}: not a persrm eval metrics.json (no 'overall'/'by_type')")
        if labels is not None:
            m["label"] = labels[i]
        m.setdefault("label", os.path.basename(os.path.dirname(os.path.abspath(path))))
        runs.append(m)
    md = compare_table(runs)
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w", encoding="utf-8") as fh:
        fh.write(md)
    plot_by_type(runs, out_png)
    return md


def plot_curve(points: Sequence[dict[str, Any]], out_png: str, *, split: str = "validation") -> str:
    """Learning curve: accuracy (95% CI) and position consistency against training steps, SFT then GRPO.

    ``points``: ``{"stage": "sft"|"grpo", "step": int (-1: the final model), "accuracy", "ci95",
    "consistency"}`` in training order; GRPO steps are drawn after the last SFT step.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    sft_end = max([p["step"] for p in points if p["stage"] == "sft"] + [0])
    xs, labels = [], []
    for p in points:
        step = p["step"] if p["step"] >= 0 else (sft_end if p["stage"] == "sft" else None)
        if p["stage"] == "grpo":
            grpo_steps = [q["step"] for q in points if q["stage"] == "grpo" and q["step"] >= 0]
            step = sft_end + (p["step"] if p["step"] >= 0 else max(grpo_steps + [0]) + 1)
        xs.append(step)
        labels.append(f"{p['stage']} {p['step'] if p['step'] >= 0 else 'final'}")
    acc = [p["accuracy"] for p in points]
    lo = [max(0.0, p["accuracy"] - (p.get("ci95") or [p["accuracy"]] * 2)[0]) for p in points]
    hi = [max(0.0, (p.get("ci95") or [p["accuracy"]] * 2)[1] - p["accuracy"]) for p in points]
    ax.errorbar(xs, acc, yerr=[lo, hi], marker="o", capsize=3, label="pairwise accuracy (95% CI)")
    cons = [(x, p["consistency"]["rate"] if isinstance(p.get("consistency"), dict) else p.get("consistency"))
            for x, p in zip(xs, points)]
    cons = [(x, c) for x, c in cons if isinstance(c, (int, float))]
    if cons:
        ax.plot([x for x, _ in cons], [c for _, c in cons], marker="s", linestyle=":", label="position consistency")
    ax.axhline(0.5, color="#888888", linestyle="--", linewidth=1, label="chance")
    if any(p["stage"] == "grpo" for p in points):
        ax.axvline(sft_end + 0.5, color="#bbbbbb", linewidth=1)
        ax.annotate("GRPO", (sft_end + 0.8, 0.03), fontsize=8, color="#666666")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimiser steps (SFT, then GRPO)")
    ax.set_ylabel(f"on {split} pairs, both orders")
    ax.set_title("Learning curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return out_png
