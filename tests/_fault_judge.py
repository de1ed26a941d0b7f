"""A loopback OpenAI-compatible judge that fails the way real ones do: real HTTP/1.1 on 127.0.0.1.

``fault`` (changeable while running) decides every ``POST /v1/chat/completions``:

``ok``       a judge-format answer: each candidate scores 1 + 9 x the share of its words the
             exemplars use (an emoji wall scores 1);
``hang``     reads the request and never answers; notes when the client gives up (``abandoned``);
``slow``     answers ``ok`` after ``delay`` seconds;
``500``      HTTP 500;  ``401``: HTTP 401;  ``404``: HTTP 404;
``garbage``  HTTP 200 with a body that is not JSON.

``GET /v1/models`` lists ``model`` (also under ``hang``/``401`` faults, unless ``models_fault``
is set). ``POST /tokenize`` counts like a byte-level tokenizer: one token per UTF-8 byte of
non-ASCII text, one per 4 ASCII characters (a real tokenizer's order of magnitude); it can be
turned off (``tokenize=False``: HTTP 404, as servers other than vLLM answer). For a refused
connection, use :func:`closed_port`. Every request body is kept in ``bodies``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections import Counter

_WORD = re.compile(r"[A-Za-z']+")


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _block(text: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL)
    return m.group(1) if m else ""


def judge_answer(user: str) -> str:
    exemplars = {w.lower() for w in _WORD.findall(_block(user, "exemplars"))}

    def score(text: str) -> int:
        words = [w.lower() for w in _WORD.findall(text)]
        return 1 + round(9 * sum(w in exemplars for w in words) / max(1, len(words)))

    a, b = score(_block(user, "response_a")), score(_block(user, "response_b"))
    return f"<think>\nA shares the exemplars' words at {a}/10, B at {b}/10.\n</think>\n<answer>[{a}, {b}]</answer>"


def count_tokens(text: str) -> int:
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return (ascii_chars + 3) // 4 + len(text.encode("utf-8")) - ascii_chars


class FaultJudge:
    def __init__(self, fault: str = "ok", *, delay: float = 0.0, model: str = "persrm", tokenize: bool = True,
                 models_fault: str | None = None):
        self.fault, self.delay, self.model, self.tokenize = fault, delay, model, tokenize
        self.models_fault = models_fault
        self.stats: Counter = Counter()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []  # the Authorization header of every request
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ HTTP
    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    content_type: str = "application/json") -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}.get(status, "X")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: keep-alive\r\n\r\n".encode() + body)
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.auth.append(headers.get("authorization"))
                await self._route(method, path, body, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _route(self, method: str, path: str, body: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.stats[path] += 1
        if path == "/fault":  # switch the fault while running: {"fault": "hang"}
            self.fault = json.loads(body)["fault"]
            return await self._send(writer, 200, json.dumps({"fault": self.fault, **self.stats}).encode())
        if path == "/stats":
            return await self._send(writer, 200, json.dumps(dict(self.stats)).encode())
        if path == "/v1/models":
            fault = self.models_fault
            if fault == "401":
                return await self._send(writer, 401, b'{"error": "bad key"}')
            if fault == "hang":
                await reader.read()
                return
            return await self._send(writer, 200, json.dumps({"data": [{"id": self.model}]}).encode())
        if path == "/tokenize":
            if not self.tokenize:
                return await self._send(writer, 404, b'{"detail": "Not Found"}')
            req = json.loads(body)
            text = req.get("prompt") or "".join(m["content"] for m in req.get("messages", []))
            extra = 10 * len(req.get("messages", []))
            return await self._send(writer, 200, json.dumps({"count": count_tokens(text) + extra}).encode())
        req = json.loads(body)
        self.bodies.append(req)
        fault = self.fault
        if fault == "hang":
            self.stats["hanging"] += 1
            await reader.read()  # until the client closes the connection
            self.stats["abandoned"] += 1
            raise ConnectionError("client left")
        if fault == "slow":
            await asyncio.sleep(self.delay)
        if fault in ("500", "401", "404"):
            return await self._send(writer, int(fault), b'{"error": "injected"}')
        if fault == "garbage":
            return await self._send(writer, 200, b"<html>proxy error</html>", "text/html")
        text = judge_answer(req["messages"][-1]["content"])
        reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        self.stats["answered"] += 1
        await self._send(writer, 200, json.dumps(reply).encode())

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FaultJudge":
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

            async def start() -> None:
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
                self.port = self._server.sockets[0].getsockname()[1]

            self._loop.run_until_complete(start())
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


if __name__ == "__main__":  # a standalone judge for benchmarks: prints "READY <url>", serves until killed
    import sys
    import time

    with FaultJudge(sys.argv[1] if len(sys.argv) > 1 else "ok") as server:
        print(f"READY {server.url}", flush=True)
        while True:
            time.sleep(3600)
