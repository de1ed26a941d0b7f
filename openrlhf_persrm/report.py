"""The report of a pipeline run, written by the run itself (``<workdir>/eval/report.md``).

Everything in it is read from what the stages wrote: the synth manifest (the data, and how often
each evidence measure alone picks the real text, by split and negative type), every judge's
``metrics.json`` (the comparison table and plot), the learning curve (``eval/curve/curve.json``),
where the trained judges disagree with the exemplar gain and who was right, and each stage's
wall-clock time (the run manifest). A recipe's ``report:`` key puts a copy, with its figures, in
``docs/``; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .eval.report import _ci, _pct, compare_table

_MEASURES = (("gain", "exemplar gain"), ("fluency", "fluency"), ("style", "style"), ("reader", "fixed reader"))


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def measures_table(evidence: dict[str, Any], split: str) -> list[str]:
    """How often each measure alone picks the real text, by negative type (synth manifest)."""
    rows = evidence.get(split)
    if not rows:
        return []
    lines = [f"| type | pairs | how alike % | " + " | ".join(name for _, name in _MEASURES) + " |",
             "|---|---|---|" + "---|" * len(_MEASURES)]
    for ntype, m in sorted(rows.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        cells = [f"**{ntype}**" if ntype == "all" else ntype, str(m["n"]), _pct(m.get("alike"))]
        cells += [_pct(m.get(key)) for key, _ in _MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def trace_of(run_dir: Path) -> dict[str, Any] | None:
    """Does a model judge's verdict follow its own reasoning? Read from ``run_dir``'s metrics (``trace``) or,
    for runs written before that metric, from its ``judgments.jsonl`` (the outputs are there)."""
    from .eval.metrics import trace_agreement
    from .eval.run import read_judgments
    from .judge_format import traced_side

    metrics = _load(run_dir / "metrics.json") or {}
    if metrics.get("trace"):
        return metrics["trace"]
    path = run_dir / "judgments.jsonl"
    if not path.is_file():
        return None
    judged, outputs = read_judgments(path)
    if any(o is None for o in outputs):  # a judge without outputs (a baseline)
        return None
    traced = [traced_side(o) for o in outputs]
    agreement = trace_agreement(judged, traced)
    return agreement if agreement["judgments"] else None


def curve_table(points: Sequence[dict[str, Any]], traces: Sequence[dict[str, Any] | None] = ()) -> list[str]:
    show_trace = any(traces)
    lines = ["| checkpoint | accuracy % [95% CI] | format failures % | consistency % |"
             + (" trace names the real text % | answer follows the trace % |" if show_trace else ""),
             "|---|---|---|---|" + ("---|---|" if show_trace else "")]
    for i, p in enumerate(points):
        name = f"{p['stage'].upper()} {'final' if p['step'] < 0 else 'step ' + str(p['step'])}"
        cons = p.get("consistency")
        cons = cons.get("rate") if isinstance(cons, dict) else cons
        row = (f"| {name} | {_pct(p['accuracy'])} {_ci(p['ci95']) if p.get('ci95') else ''} | "
               f"{_pct(p.get('format_failure_rate'))} | {_pct(cons)} |")
        if show_trace:
            t = traces[i] if i < len(traces) else None
            row += (f" {_pct(t.get('traced_right_rate'))} | {_pct(t.get('follows_rate'))} |" if t else " - | - |")
        lines.append(row)
    return lines


def trace_table(named: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| judge | judgments with a traced side | trace names the real text % | answer follows the trace % |",
             "|---|---|---|---|"]
    for label, t in named:
        lines.append(f"| {label} | {t['judgments']} | {_pct(t.get('traced_right_rate'))} | "
                     f"{_pct(t.get('follows_rate'))} |")
    return lines


def versus_gain_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| judge | type | judgments | agree with gain | disagree | judge right | gain right |",
             "|---|---|---|---|---|---|---|"]
    found = False
    for m in runs:
        vs = m.get("versus_gain")
        if not vs:
            continue
        found = True
        for ntype, c in [("all", vs["overall"])] + sorted(vs["by_type"].items()):
            lines.append(f"| {m.get('label', '?')} | {ntype} | {c.get('judgments', 0)} | {c.get('agree', 0)} | "
                         f"{c.get('disagree', 0)} | {c.get('judge_right', 0)} | {c.get('measure_right', 0)} |")
    return lines if found else []


def write_report(pipeline: Any, metrics_paths: Sequence[str], copy_to: str | None = None) -> str:
    """Write ``<workdir>/eval/report.md`` (and a copy with its figures at ``copy_to``); returns its path."""
    work = Path(pipeline.work)
    eval_dir = work / "eval"
    found = [(m, Path(p).parent) for m, p in ((_load(Path(p)), p) for p in metrics_paths) if m]
    runs = [m for m, _ in found]
    manifest = _load(work / "manifest.json") or {}
    synth = _load(work / "data" / "manifest.json") or {}
    spec = pipeline.r.eval
    figures = {"compare": eval_dir / "compare.png", "curve": eval_dir / "curve" / "learning_curve.png"}
    prefix = Path(copy_to).stem + "_" if copy_to else ""

    def fig(key: str) -> str:
        return f"{prefix}{figures[key].name}" if copy_to else os.path.relpath(figures[key], eval_dir)

    out = [f"# {pipeline.r.name}: results", "",
           "Written by `persrm pipeline` from this run's outputs; rerun the recipe to remake it:", "",
           "```bash", f"persrm pipeline {getattr(pipeline, 'recipe_path', 'RECIPE.yaml')}", "```", ""]
    stages = manifest.get("stages", {})
    if stages:
        import time

        def took(v: dict[str, Any]) -> float | None:  # the running stage (eval itself): its time so far
            if isinstance(v.get("seconds"), (int, float)) and v.get("status") != "running":
                return v["seconds"]
            return time.time() - v["started"] if v.get("status") == "running" and v.get("started") else None

        times = ", ".join(f"{name} {took(v) / 60:.0f} min" for name, v in stages.items() if took(v) is not None)
        out += [f"Stage times on the machine that ran it: {times}.", ""]
    counts = synth.get("counts")
    if counts:
        out += ["## Data", "", "Pairs by split and negative type (`data/manifest.json`):", "",
                "| split | " + " | ".join(sorted({t for c in counts.values() for t in c})) + " |",
                "|---|" + "---|" * len({t for c in counts.values() for t in c})]
        types = sorted({t for c in counts.values() for t in c})
        out += [f"| {split} | " + " | ".join(str(c.get(t, 0)) for t in types) + " |" for split, c in counts.items()]
        out.append("")
    evidence = synth.get("evidence")
    if evidence and spec is not None:
        split = spec.split or "test_unseen_authors"
        table = measures_table(evidence, split)
        if table:
            out += [f"## Each measure alone ({split})", "",
                    f"How often each measure of the evidence alone picks the real text (ties count half); scorer "
                    f"`{evidence.get('scorer')}`. The fixed reader trusts fluency when the candidates are nearly "
                    "identical and the exemplar gain otherwise; it is what the evidence traces teach.", ""] + table + [""]
    if runs:
        out += ["## Judges", "", f"On `{spec.split if spec else '?'}`" + (", both A/B orders" if spec and spec.both_orders
                                                                           else "") + ":", "", compare_table(runs),
                f"![comparison]({fig('compare')})", ""]
    traced = [(m.get("label", "?"), t) for m, run_dir in found if (t := trace_of(run_dir))]
    if traced:
        out += ["## Does the verdict follow the reasoning?", "",
                "For the model judges whose reasoning names a side (\"... favours A\"): how often that side is the real "
                "text, and how often the answer scores it higher. A judge that reads the evidence but does not "
                "follow its own reasoning shows here:", ""] + trace_table(traced) + [""]
    curve = _load(eval_dir / "curve" / "curve.json")
    if curve:
        traces = [trace_of(eval_dir / "curve" / f"{p['stage']}_{p['step']}") for p in curve]
        out += ["## Learning curve", "", f"Every saved checkpoint on `{spec.curve['split']}`, both orders "
                "(`eval/curve/curve.json`):", ""] + curve_table(curve, traces) + [
                    "", f"![learning curve]({fig('curve')})", ""]
    vs = versus_gain_table(runs)
    if vs:
        out += ["## Where the judge and the exemplar gain disagree", "",
                "Judgments where a trained judge's verdict and the exemplar gain's differ, and who picked the real "
                "text:", ""] + vs + [""]
    text = "\n".join(out)
    path = eval_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    if copy_to:
        dest = Path(copy_to)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        for key, src in figures.items():
            if src.exists():
                shutil.copyfile(src, dest.parent / f"{prefix}{src.name}")
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m openrlhf_persrm.report RECIPE [--workdir DIR]``: rewrite a finished run's report (and its
    ``report:`` copy) from what its stages wrote, without judging anything again (e.g. after a release adds
    a section to the report)."""
    import argparse

    from .pipeline import Pipeline, Recipe

    ap = argparse.ArgumentParser(prog="python -m openrlhf_persrm.report", description=main.__doc__)
    ap.add_argument("recipe")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    recipe = Recipe.load(args.recipe)
    if args.workdir:
        recipe.workdir = args.workdir
    if recipe.eval is None:
        ap.error(f"{args.recipe} has no eval stage")
    pipeline = Pipeline(recipe)
    pipeline.recipe_path = os.path.relpath(args.recipe)
    paths = [str(pipeline.work / "eval" / j / "metrics.json") for j in recipe.eval.judges]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        ap.error(f"the run has not judged {missing}: run `persrm pipeline {args.recipe}` first")
    print(write_report(pipeline, paths, copy_to=recipe.report or None))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
