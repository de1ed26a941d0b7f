"""``persrm serve`` under load: 64 clients against a working judge, then against a hung one.

    python benchmarks/serve_load.py [--clients 64] [--seconds 10] [--deadline 3]

The server runs in this process on 127.0.0.1 with the ``openai`` backend pointed at a loopback
judge (tests/_fault_judge.py: real HTTP, a judge-format answer per request). ``--clients``
asyncio clients each post OpenRLHF's one-sample ``/get_reward`` requests back to back for
``--seconds`` (distinct bodies, so nothing is answered from the retry cache). Phase 1: the
judge answers. Phase 2: the judge hangs (accepts every request, never answers): every answer
must come back by the reward's ``deadline_s`` (``--deadline``) plus queueing, with the failure
reward, and nothing may be lost. Prints requests/s, p50/p99 latency and errors per phase, then
``p99_hung_over_deadline=<ratio>`` last (must stay below 1 plus a little for queueing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PROMPT = "<|im_start|>user\nHow was your morning?<|im_end|>\n<|im_start|>assistant\n"
LABEL = {"exemplars": ["Up at six. Dog walked. Coffee, black.", "Rain again; I walked anyway."],
         "reference": "Up early, walked the dog, coffee black.", "prompt": "How was your morning?"}


async def client(url: str, i: int, until: float, latencies: list[float], errors: list[str],
                 rewards: list[float]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=180) as http:  # OpenRLHF's client timeout
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
            except Exception as exc:  # noqa: BLE001 -- counted
                errors.append(type(exc).__name__)
                continue
            finally:
                latencies.append(time.monotonic() - start)


def phase(name: str, url: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    rewards: list[float] = []

    async def everyone() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(url, i, until, latencies, errors, rewards) for i in range(clients)))

    start = time.monotonic()
    asyncio.run(everyone())
    elapsed = time.monotonic() - start
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) if ordered else float("nan")
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")
    failed = sum(r == -1.0 for r in rewards)
    print(f"{name:>6}: {len(latencies)} requests in {elapsed:5.1f} s = {len(latencies) / elapsed:7.1f} requests/s; "
          f"p50 {p50:6.3f} s, p99 {p99:6.3f} s, max {max(ordered, default=float('nan')):6.3f} s; "
          f"errors {len(errors)} {sorted(set(errors))}; failure rewards {failed}/{len(rewards)}", flush=True)
    return {"rps": len(latencies) / elapsed, "p50": p50, "p99": p99, "errors": len(errors)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--deadline", type=float, default=3.0, help="the reward's deadline_s")
    args = parser.parse_args(argv)

    from _fault_judge import FaultJudge
    from openrlhf_persrm.rewards.persrm import PersRMReward
    from openrlhf_persrm.serve import ServeConfig, make_app, running_server, setup_logging

    setup_logging("warning")
    with FaultJudge("ok") as judge:
        reward = PersRMReward(endpoint=judge.url, served_model="persrm", deadline_s=args.deadline,
                              stop_after_steps=0, backend_config={"concurrency": 256})
        reward.probe()
        with running_server(make_app(reward, ServeConfig(retry_cache_s=0))) as url:
            print(f"{args.clients} clients, {args.seconds:g} s per phase, deadline_s={args.deadline:g}", flush=True)
            ok = phase("judge", url, args.clients, args.seconds)
            judge.fault = "hang"
            hung = phase("hung", url, args.clients, max(args.seconds, 2 * args.deadline))
            print(f"abandoned judge calls cancelled: {reward.judge.stats['cancelled']}; "
                  f"still hanging at the judge: {judge.stats['hanging'] - judge.stats['abandoned']}", flush=True)
        reward.judge.close()
    print(f"rps_judge={ok['rps']:.1f}")
    print(f"p99_judge_s={ok['p99']:.3f}")
    print(f"errors={ok['errors'] + hung['errors']}")
    print(f"p99_hung_over_deadline={hung['p99'] / args.deadline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
