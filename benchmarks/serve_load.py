"""``persrm serve`` under load: 64 clients against a working judge, then against a hung one.

    python benchmarks/serve_load.py [--clients 64] [--seconds 10] [--deadline 3]

Three processes, as in a run: a loopback judge (tests/_fault_judge.py: real HTTP, an
OpenAI-compatible judge-format answer per request, vLLM's ``/tokenize``), ``persrm serve`` with
the ``openai`` backend pointed at it, and here ``--clients`` asyncio clients, each posting
OpenRLHF's one-sample ``/get_reward`` requests back to back for ``--seconds`` (distinct bodies,
so nothing comes from the retry cache). Phase 1: the judge answers. Phase 2: the judge hangs
(accepts every request, never answers): every answer must come back by the reward's
``deadline_s`` (``--deadline``), with the failure reward, and nothing may be lost. Prints
requests/s, p50/p99 latency and errors per phase, then ``name=value`` lines: the hung phase's
p99 of ``/get_reward`` over ``deadline_s`` and over OpenRLHF's 180 s client timeout (both below 1:
the target, on an idle machine), each also measured inside the server (``Server-Timing``: arrival
to answer), which leaves out the time the clients' own process waits for a CPU; last
``p99_hung_over_deadline=<ratio>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

#: OpenRLHF 0.11.2's HTTP reward client gives up on a request after this many seconds (aiohttp total timeout).
OPENRLHF_TIMEOUT_S = 180.0
PROMPT = "<|im_start|>user\nHow was your morning?<|im_end|>\n<|im_start|>assistant\n"
LABEL = {"exemplars": ["Up at six. Dog walked. Coffee, black.", "Rain again; I walked anyway."],
         "reference": "Up early, walked the dog, coffee black.", "prompt": "How was your morning?"}


async def client(http: Any, url: str, i: int, until: float, latencies: list[float], errors: list[str],
                 rewards: list[float], server_side: list[float]) -> None:
    n = 0
    while time.monotonic() < until:
        body = {"query": [f"{PROMPT}client {i} answer {n}: up at seven, dog walked.<|im_end|>"],
                "prompts": [PROMPT], "labels": [LABEL]}
        n += 1
        start = time.monotonic()
        try:
            response = await http.post(url + "/get_reward", json=body)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}")
                continue
            rewards.extend(response.json()["rewards"])
            timing = response.headers.get("server-timing", "")
            if "dur=" in timing:
                server_side.append(float(timing.split("dur=")[1]) / 1000)
        except Exception as exc:  # noqa: BLE001 -- counted
            errors.append(type(exc).__name__)
            continue
        finally:
            latencies.append(time.monotonic() - start)


def phase(name: str, url: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    rewards: list[float] = []
    server_side: list[float] = []

    async def everyone() -> None:
        import httpx

        # one client with a connection per simulated client (building 64 clients costs seconds of CPU)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=OPENRLHF_TIMEOUT_S, limits=limits) as http:
            until = time.monotonic() + seconds
            await asyncio.gather(*(client(http, url, i, until, latencies, errors, rewards, server_side)
                                   for i in range(clients)))

    start = time.monotonic()
    asyncio.run(everyone())
    elapsed = time.monotonic() - start
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) if ordered else float("nan")
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")
    failed = sum(r == -1.0 for r in rewards)
    inside = sorted(server_side)
    server_p99 = inside[min(len(inside) - 1, int(0.99 * len(inside)))] if inside else float("nan")
    print(f"{name:>6}: {len(latencies)} requests in {elapsed:5.1f} s = {len(latencies) / elapsed:7.1f} requests/s; "
          f"p50 {p50:6.3f} s, p99 {p99:6.3f} s, max {max(ordered, default=float('nan')):6.3f} s; "
          f"errors {len(errors)} {sorted(set(errors))}; failure rewards {failed}/{len(rewards)}; "
          f"server-side p99 (arrival to answer) {server_p99:6.3f} s", flush=True)
    return {"rps": len(latencies) / elapsed, "p50": p50, "p99": p99, "errors": len(errors), "server_p99": server_p99}


def _start(cmd: list[str], ready: str) -> tuple["subprocess.Popen", str]:
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    seen = ""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd[:4]} exited: {seen[-2000:]}")
        seen += line
        if ready in line:
            return proc, line


def main(argv: list[str] | None = None) -> int:
    import json
    import socket
    import urllib.request

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--deadline", type=float, default=3.0, help="the reward's deadline_s")
    args = parser.parse_args(argv)

    judge, line = _start([sys.executable, str(REPO / "tests" / "_fault_judge.py"), "ok"], "READY")
    judge_url = line.split()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, _ = _start([sys.executable, "-m", "openrlhf_persrm.cli.main", "serve", "--port", str(port),
                        "--log_level", "warning", "--retry_cache_s", "0", "--reward.endpoint", judge_url,
                        "--reward.served_model", "persrm", "--reward.deadline_s", str(args.deadline),
                        "--reward.stop_after_steps", "0", "--reward.backend_config", '{"concurrency": 256}'],
                       "ready")
    url = f"http://127.0.0.1:{port}"
    waited = time.monotonic() + 120
    while True:  # "ready" comes before uvicorn listens
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > waited or server.poll() is not None:
                raise RuntimeError("persrm serve did not come up") from None
            time.sleep(0.2)
    try:
        print(f"{args.clients} clients, {args.seconds:g} s per phase, deadline_s={args.deadline:g}", flush=True)
        ok = phase("judge", url, args.clients, args.seconds)
        urllib.request.urlopen(urllib.request.Request(judge_url + "/fault", data=b'{"fault": "hang"}',
                                                      method="POST"), timeout=10).read()
        hung = phase("hung", url, args.clients, max(args.seconds, 2 * args.deadline))
        time.sleep(1)
        stats = json.loads(urllib.request.urlopen(judge_url + "/stats", timeout=10).read())
        print(f"judge calls left hanging at the judge: {stats.get('hanging', 0) - stats.get('abandoned', 0)} "
              f"of {stats.get('hanging', 0)} (the rest were cancelled by the server)", flush=True)
    finally:
        for proc in (server, judge):
            proc.terminate()
            proc.wait(30)
    print(f"rps_judge={ok['rps']:.1f}")
    print(f"p50_judge_s={ok['p50']:.3f}")
    print(f"p99_judge_s={ok['p99']:.3f}")
    print(f"rps_hung={hung['rps']:.1f}")
    print(f"p99_hung_s={hung['p99']:.3f}")
    print(f"errors={ok['errors'] + hung['errors']}")
    print(f"server_p99_hung_s={hung['server_p99']:.3f}")
    print(f"p99_hung_over_openrlhf_timeout={hung['p99'] / OPENRLHF_TIMEOUT_S:.4f}")
    print(f"server_p99_hung_over_deadline={hung['server_p99'] / args.deadline:.3f}")
    below = hung["p99"] < args.deadline and hung["p99"] < OPENRLHF_TIMEOUT_S
    print(f"p99_hung_below_both={'yes' if below else 'no'} (p99 {hung['p99']:.3f} s vs deadline_s {args.deadline:g} s "
          f"and OpenRLHF's {OPENRLHF_TIMEOUT_S:g} s)")
    print(f"p99_hung_over_deadline={hung['p99'] / args.deadline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
