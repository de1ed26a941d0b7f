"""Which reading of the evidence should the traces teach? Rules compared on train and validation pairs.

    python benchmarks/reader_rules.py runs/smollm2-cpu-evidence/data/pairs.jsonl

Reads the evidence stored on the pairs (``persrm synth --evidence.scorer``) and scores, by negative type,
the fixed reader (fluency when the candidates are at least ``alike`` alike, exemplar gain otherwise) for a
grid of thresholds, and variants that fall back to style when the gain barely separates the candidates.
Thresholds are chosen on the train split and reported on validation; the test split is never read.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(path: str) -> int:
    from openrlhf_persrm.evidence.measures import favours
    from openrlhf_persrm.pairs import load_pairs

    records, _ = load_pairs(path)
    data: dict[str, list] = defaultdict(list)
    for r in records:
        split = r.extra.get("split")
        if split in ("train", "validation") and r.evidence is not None:
            data[split].append((r.negative_type, r.evidence))

    def rule(alike: float, barely: float = 0.0, fallback: str = "style"):
        def read(ev):
            measure = "fluency" if ev.alike >= alike else "gain"
            side, margin = favours(ev, measure)
            if measure == "gain" and margin < barely:
                side, _ = favours(ev, fallback)
            return side
        return read

    def accuracy(read, rows):
        by: dict[str, list[float]] = defaultdict(list)
        for ntype, ev in rows:
            side = read(ev)
            v = 1.0 if side == "A" else 0.5 if side is None else 0.0
            by[ntype].append(v)
            by["all"].append(v)
        return {t: sum(v) / len(v) for t, v in by.items()}

    grid = [(a, b, f) for a in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9) for b in (0.0, 0.01, 0.02, 0.04)
            for f in (("style", "fluency") if b else ("style",))]
    scored = [(accuracy(rule(*g), data["train"])["all"], g) for g in grid]
    scored.sort(reverse=True)
    types = sorted({t for t, _ in data["train"] + data["validation"]})
    print(f"pairs with evidence: train {len(data['train'])}, validation {len(data['validation'])}")
    print("| rule (alike, gain-barely, fallback) | train | validation | " + " | ".join(types) + " |")
    print("|---|---|---|" + "---|" * len(types))
    for acc, g in scored[:8] + [(accuracy(rule(0.6), data["train"])["all"], (0.6, 0.0, "style"))]:
        val = accuracy(rule(*g), data["validation"])
        print(f"| {g} | {100 * acc:.1f} | {100 * val['all']:.1f} | " +
              " | ".join(f"{100 * val.get(t, float('nan')):.1f}" for t in types) + " |")
    for split in ("train", "validation"):
        for m in ("gain", "fluency", "style"):
            acc = accuracy(lambda ev, m=m: favours(ev, m)[0], data[split])
            print(f"{split} {m} alone: " + ", ".join(f"{t} {100 * v:.1f}" for t, v in sorted(acc.items())))
    margins = sorted(favours(ev, "gain")[1] for _, ev in data["train"])
    print("gain margin quantiles (train):", [round(margins[int(q * (len(margins) - 1))], 3)
                                             for q in (0.1, 0.25, 0.5, 0.75, 0.9)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
