"""Pairs per second of `persrm synth` against a local OpenAI-compatible server with 200 ms latency,
at concurrency 1 and 32 in the same run, on the same workload; prints ``speedup=<ratio>`` last.

    python benchmarks/teacher_concurrency.py [--latency 0.2] [--high 32] [--authors 4] [--per_author 12]

Both concurrencies synthesise the same corpus slice (``--authors`` demo authors x
``--per_author`` paragraphs, same seed), so they make the same pairs and the same requests;
the script checks that and reports the request counts.

The server (tests/_openai_server.py) runs in its own process, so client and server do not
share a GIL. The teacher cache is off: every request goes over HTTP. Each pair is one
style_mimic or style_random continuation plus its reasoning traces (both A/B orders,
rejection sampling), exactly as in a real run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(base_url: str, concurrency: int, authors: int | None, per_author: int | None) -> tuple[int, int, float]:
    from data_synth.cli import config_from_args, make_parser
    from data_synth.pipeline import run_synth

    with tempfile.TemporaryDirectory() as out:
        argv = ["--input", "demo", "--output_dir", out, "--teacher.backend", "openai", "--teacher.base_url", base_url,
                "--teacher.model", "fake-teacher", "--teacher.cache", "false",
                "--teacher.concurrency", str(concurrency), "--pairs.negative_types", "style_mimic,style_random",
                "--traces.splits", "train,validation,test_unseen_authors,test_unseen_works", "--progress", "false"]
        if authors:
            argv += ["--corpus.max_authors", str(authors)]
        if per_author:
            argv += ["--corpus.max_paragraphs_per_author", str(per_author)]
        cfg = config_from_args(make_parser().parse_args(argv))
        start = time.perf_counter()
        run_synth(cfg)
        elapsed = time.perf_counter() - start
        stats = [json.loads(l) for l in open(Path(out) / ".work/run_stats.jsonl")][-1]
    return stats["tasks_finished_now"], stats["teacher_stats"].get("requests", 0), elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    ap.add_argument("--high", type=int, default=32, help="the high concurrency to compare with 1")
    ap.add_argument("--authors", type=int, default=4, help="demo authors in the workload (both runs)")
    ap.add_argument("--per_author", type=int, default=12, help="paragraphs per author in the workload (both runs)")
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, str(REPO / "tests/_openai_server.py"), "--latency", str(args.latency),
                               "--bad_content_rate", "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline().strip()
        if not line.startswith("READY "):
            raise SystemExit(f"server did not start: {line!r}")
        base_url = line.split(" ", 1)[1]
        low = run(base_url, 1, authors=args.authors, per_author=args.per_author)
        high = run(base_url, args.high, authors=args.authors, per_author=args.per_author)
    finally:
        server.terminate()
        server.wait()
    rates = {}
    for name, conc, (pairs, requests, elapsed) in (("low", 1, low), ("high", args.high, high)):
        rates[name] = pairs / elapsed
        print(f"concurrency={conc:>3}: {pairs} pairs ({requests} requests) in {elapsed:.1f} s "
              f"-> {rates[name]:.2f} pairs/s, {requests / elapsed:.1f} requests/s "
              f"(server latency {args.latency * 1000:.0f} ms)")
    if low[0] != high[0]:
        print(f"warning: the two runs made different numbers of pairs ({low[0]} vs {high[0]})")
    print(f"speedup={rates['high'] / rates['low']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
