"""A fake OpenAI-compatible chat-completions server: real HTTP/1.1 on 127.0.0.1, stdlib only.

Used by the data_synth tests and ``benchmarks/teacher_concurrency.py``. Replies are
realistic and deterministic functions of the request body:

* judge requests (the PersRM system prompt) get ``<think>...</think><answer>[a, b]</answer>``
  preferring the candidate whose vocabulary overlaps the exemplars more; a share of them
  are malformed (unclosed reasoning, a one-number answer, no answer) or prefer the other;
* continuation requests get a paragraph of about the asked length, built from the
  exemplars' words (imitation) or a stock register (random style); a share are chatty
  stubs too short to pass the length check.

Transport faults hit the *first* attempt of chosen requests (by hash), so a client that
retries always gets the same final content: HTTP 500, a reply slower than the client's
timeout, or a body that is not JSON. ``latency`` delays every reply (asyncio, so requests
are served concurrently).

Run standalone: ``python tests/_openai_server.py --latency 0.2`` prints ``READY <base_url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter

JUDGE_MARKER = "You are PersRM"
_WORD = re.compile(r"[A-Za-z']+")

_STOCK = {
    "blogger": "Okay so this is honestly the best thing ever! You have to try it. Seriously, it changed my whole "
               "morning routine and I am obsessed. Grab a coffee, take a breath, and just go for it!",
    "report": "At approximately 14:00 hours the reporting officer attended the location. No further action was "
              "required at that time. The individual was advised accordingly and the matter was logged.",
    "tech": "Step one: remove the cover. Step two: locate the reset switch. Step three: hold the switch for ten "
            "seconds until the indicator light flashes green, then release it and wait.",
}


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _bucket(key: str, salt: str) -> float:
    return int(hashlib.sha256((salt + key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _between(text: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
    return m.group(1) if m else ""


def judge_reply(user: str, rng: random.Random, bad_rate: float) -> str:
    exemplars = set(w.lower() for w in _WORD.findall(_between(user, "exemplars")))
    a, b = _between(user, "response_a"), _between(user, "response_b")

    def overlap(text: str) -> float:
        toks = [w.lower() for w in _WORD.findall(text)]
        return sum(t in exemplars for t in toks) / max(1, len(toks))

    oa, ob = overlap(a), overlap(b)
    prefer_a = oa >= ob
    if rng.random() < 0.15:
        prefer_a = not prefer_a  # an imperfect judge: rejection sampling has work to do
    hi, lo = rng.randint(7, 9), rng.randint(2, 5)
    scores = (hi, lo) if prefer_a else (lo, hi)
    reasoning = (f"The exemplars show a consistent voice. Response A shares {100 * oa:.0f}% of its words with "
                 f"them, Response B {100 * ob:.0f}%. Response {'A' if prefer_a else 'B'} keeps the writer's "
                 "rhythm, punctuation and vocabulary; the other drifts in tone and word choice.")
    roll = rng.random()
    if roll < bad_rate / 3:
        return f"<think>{reasoning}"  # never closed
    if roll < 2 * bad_rate / 3:
        return f"<think>{reasoning}</think>\n<answer>[{scores[0]}]</answer>"
    if roll < bad_rate:
        return f"<think>{reasoning}</think>\nBoth are fine."
    return f"<think>\n{reasoning}\n</think>\n<answer>[{scores[0]}, {scores[1]}]</answer>"


def continuation_reply(user: str, rng: random.Random, bad_rate: float) -> str:
    m = re.search(r"about (\d+) words", user)
    n = int(m.group(1)) if m else 60
    if rng.random() < bad_rate:
        return "Sure! Here is the continuation:"
    passages = re.findall(r"<passage>\n(.*?)\n</passage>", user, re.DOTALL)
    if passages:
        pool = [w for p in passages for w in p.split()]
        start = rng.randrange(max(1, len(pool)))
        words = []
        while len(words) < n:
            k = rng.randint(5, 12)
            chunk = [pool[(start + i) % len(pool)] for i in range(k)]
            start = rng.randrange(len(pool))
            words.extend(chunk)
            words[-1] = words[-1].rstrip(",;:") + "."
        # Shuffle chunk order so no long run is copied verbatim from one exemplar.
        text = " ".join(words[:n])
        return "Here is the continuation:\n" + text
    stock = list(_STOCK.values())[rng.randrange(len(_STOCK))]
    words = []
    while len(words) < n:
        words.extend(stock.split())
    return " ".join(words[:n])


class FakeOpenAIServer:
    """Start with ``with FakeOpenAIServer(...) as srv: srv.base_url``. Serves in a thread."""

    def __init__(self, *, latency: float = 0.0, fail_rate: float = 0.0, slow_rate: float = 0.0,
                 slow_seconds: float = 3.0, malformed_rate: float = 0.0, bad_content_rate: float = 0.1,
                 truncate_rate: float = 0.0,
                 model: str = "fake-teacher", host: str = "127.0.0.1", port: int = 0):
        self.latency, self.fail_rate, self.slow_rate = latency, fail_rate, slow_rate
        self.slow_seconds, self.malformed_rate, self.bad_content_rate = slow_seconds, malformed_rate, bad_content_rate
        self.truncate_rate = truncate_rate  # replies cut mid-sentence, as at max_tokens ("length")
        self.model, self.host, self.port = model, host, port
        self.stats: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                status, payload = await self._route(method, path, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                             "Connection: keep-alive\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if method == "GET" and path.rstrip("/").endswith("/models"):
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            return 404, {"error": {"message": f"no route {method} {path}"}}
        try:
            req = json.loads(body)
        except json.JSONDecodeError:
            return 400, {"error": {"message": "body is not JSON"}}
        if req.get("model") != self.model:
            return 404, {"error": {"message": f"model {req.get('model')!r} not found"}}
        key = _key(req)
        self._attempts[key] += 1
        first = self._attempts[key] == 1
        self.stats["requests"] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if first and _bucket(key, "slow") < self.slow_rate:
                self.stats["slow"] += 1
                await asyncio.sleep(self.slow_seconds)
            if self.latency:
                await asyncio.sleep(self.latency)
            if first and _bucket(key, "fail") < self.fail_rate:
                self.stats["http_500"] += 1
                return 500, {"error": {"message": "internal error (injected)"}}
            if first and _bucket(key, "malformed") < self.malformed_rate:
                self.stats["malformed"] += 1
                return 200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "trunc'
            messages = req.get("messages", [])
            system = next((m["content"] for m in messages if m.get("role") == "system"), "")
            user = next((m["content"] for m in messages if m.get("role") == "user"), "")
            rng = random.Random(key)
            if system.startswith(JUDGE_MARKER):
                text = judge_reply(user, rng, self.bad_content_rate)
                self.stats["judge"] += 1
            else:
                text = continuation_reply(user, rng, self.bad_content_rate)
                self.stats["continuation"] += 1
            finish = "stop"
            if _bucket(key, "truncate") < self.truncate_rate:
                text = " ".join(text.split()[: max(3, len(text.split()) // 2)]).rstrip(".!?\"'")
                finish = "length"
                self.stats["truncated"] += 1
            self.stats["ok"] += 1
            return 200, {
                "id": "chatcmpl-" + key[:12], "object": "chat.completion", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(text.split()),
                          "total_tokens": len(user.split()) + len(text.split())},
            }
        finally:
            self.in_flight -= 1

    # ---------------------------------------------------------------- lifecycle
    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._serve_task = self._loop.create_task(self.serve())
        try:
            self._loop.run_until_complete(self._serve_task)
        except (asyncio.CancelledError, Exception):
            pass
        finally:
            # Shutting down cancels handlers of open keep-alive connections: not errors.
            self._loop.set_exception_handler(lambda loop, context: None)
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-openai")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._serve_task.cancel)
            except RuntimeError:
                pass  # the loop already stopped
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--fail_rate", type=float, default=0.0)
    ap.add_argument("--slow_rate", type=float, default=0.0)
    ap.add_argument("--malformed_rate", type=float, default=0.0)
    ap.add_argument("--bad_content_rate", type=float, default=0.1)
    ap.add_argument("--model", default="fake-teacher")
    args = ap.parse_args()
    server = FakeOpenAIServer(latency=args.latency, fail_rate=args.fail_rate, slow_rate=args.slow_rate,
                              malformed_rate=args.malformed_rate, bad_content_rate=args.bad_content_rate,
                              model=args.model, port=args.port)
    server.start()
    print(f"READY {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
