"""Run the benchmarks and write their figures to ``docs/benchmarks.md`` (and refresh the README's copy).

    python benchmarks/run_all.py [--only serve_load,reward_overhead] [--out docs/benchmarks.md]

Each benchmark runs alone, in its own process, with its default arguments; every ``name=value`` line
it prints is its result. A row records when, on which commit and machine it was measured, and the
machine's load average when it started (the figures are only comparable as ratios within one run,
and a busy machine shows in the load). ``--only`` reruns some and keeps the other rows as they were.
Exits non-zero when a benchmark fails (its row then says so, with its last lines in the log).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Benchmarks in the order they run; reader_rules needs a study's pairs and toy_rewards is a plugin.
BENCHMARKS = ("reward_overhead", "judge_batching", "serve_load", "order_consistency", "rollout_engine",
              "teacher_concurrency", "grpo_learning")
_FIGURE = re.compile(r"^([a-z][a-z0-9_]*)=(\S+)$")
_ROW = re.compile(r"^\| `benchmarks/(\w+)\.py` \|")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _commit() -> str:
    try:
        # "-dirty": measured with uncommitted changes
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_one(name: str, log_dir: Path) -> str:
    """Run ``benchmarks/<name>.py``; returns its results row."""
    log = log_dir / f"{name}.log"
    load = os.getloadavg()[0]
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py")], cwd=ROOT, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    figures = [m.group(0) for m in map(_FIGURE.match, (line.strip() for line in lines)) if m]
    result = ", ".join(f"`{f}`" for f in figures) if rc == 0 else f"**failed (exit {rc})**, see `{log}`"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    print(f"== {name}: {'ok' if rc == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    for line in (figures if rc == 0 else lines[-15:]):
        print(f"   {line}", flush=True)
    return (f"| `benchmarks/{name}.py` | {result} | {seconds:.0f} | {load:.1f} | {when}, {_commit()} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--logs", default=str(ROOT / ".cache" / "bench"))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if not (ROOT / "benchmarks" / f"{n}.py").is_file()]
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    log_dir = Path(args.logs)
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rows: dict[str, str] = {}
    if out.exists():  # rows not rerun stay as they were
        for line in out.read_text(encoding="utf-8").splitlines():
            m = _ROW.match(line)
            if m:
                rows[m.group(1)] = line
    failed = 0
    for name in names:
        rows[name] = run_one(name, log_dir)
        failed += "**failed" in rows[name]
    order = [n for n in BENCHMARKS if n in rows] + sorted(set(rows) - set(BENCHMARKS))
    text = "\n".join([
        "# Benchmarks", "",
        "Written by `python benchmarks/run_all.py` (`make bench`); each row by the run that measured it.",
        f"Machine of the last run: {_cpu()}, {os.cpu_count()} CPUs. Figures are `name=value` lines as the "
        "benchmark printed them; compare ratios within a row, not absolute figures across machines "
        "(the load average at its start shows a busy machine).", "",
        "## Results", "",
        "| benchmark | figures | seconds | load at start | measured |",
        "|---|---|---|---|---|",
        *[rows[n] for n in order], ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    if out.resolve() == (ROOT / "docs" / "benchmarks.md").resolve():
        from openrlhf_persrm.docsync import main as docsync

        docsync([str(ROOT / "README.md")])  # the README's copy of the table
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
