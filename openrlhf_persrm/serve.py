"""``persrm serve``: PersRM behind OpenRLHF's remote reward-model protocol.

Endpoints:

``POST /get_reward``
    OpenRLHF's protocol (what ``--reward.remote_url http://HOST:PORT/get_reward`` posts):
    ``{"query": [...], "prompts": [...], "labels": [...]}`` ->
    ``{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}``, computed by the
    ``persrm`` reward plugin (:class:`~openrlhf_persrm.rewards.persrm.PersRMReward`); each label
    carries the user's exemplars and a reference response.
``POST /judge``
    one raw pairwise judgment: ``{"exemplars": [...], "prompt": str, "response_a": str,
    "response_b": str}`` -> ``{"ok", "scores": [a, b] | null, "preferred": "A" | "B" | "tie" | null,
    "failure", "kind", "detail", "text"}``.
``GET /health``
    ``{"status": "ok" | "degraded" | "down", "judge": {...}, ...}``: the judge's state, its recent
    failure rate and failures by kind; HTTP 503 when the judge is down. Needs no token.

Time: every answer comes within the reward's ``deadline_s`` (default 90 s, inside OpenRLHF's
180 s client timeout) plus queueing: judgments not finished by then are cancelled and score the
reward's ``failure_reward``. A request OpenRLHF retries (same body) joins the judging already
under way, or gets its answer again, instead of starting the judgments twice. When the judge is
declared down (the stop rule: failures above ``stop_failure_rate`` for ``stop_after_steps``
windows), ``/get_reward`` and ``/judge`` answer 503 with the cause, which stops OpenRLHF's run.
Start-up judges a probe pair first and exits (status 1, cause named) when the judge cannot answer.

Limits: bytes, samples and candidate length per request, judgments per request
(``--max_request_judgments``) and judgments queued over all requests (``--max_queued_judgments``;
HTTP 429 when full); a body must arrive within ``--body_timeout_s`` (HTTP 408). Malformed input
gets a 4xx with a message (deeply nested JSON included); a sample with text that is not valid
UTF-8 fails alone.

It listens on 127.0.0.1 unless told otherwise. With a token (``$PERSRM_SERVE_TOKEN`` or
``--token_file``; never on the command line, where ``ps`` shows it) every request but ``/health``
needs ``Authorization: Bearer <token>`` (OpenRLHF's own client sends none: keep such a server
on loopback or behind a proxy that adds it). Each request runs the plugin in a worker thread,
so concurrent requests reach the judge backend together and it batches them.

FastAPI and uvicorn are imported when the server is built (``pip install
"openrlhf-persrm[serve]"``).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (``Request``,
# imported inside make_app so this module stays cheap) as live objects.
import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

logger = logging.getLogger("openrlhf_persrm.serve")

ENV_TOKEN = "PERSRM_SERVE_TOKEN"
#: Clashes with neither vLLM (8000) nor OpenRLHF's ``serve_rm`` (5000).
DEFAULT_PORT = 8765


@dataclass
class ServeConfig:
    """Settings of the HTTP server itself (the reward has its own, ``--reward.*``)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str = ""
    token_file: str = ""
    max_request_bytes: int = 8 << 20
    max_batch: int = 512
    max_candidate_chars: int = 100_000
    max_request_judgments: int = 2048
    max_queued_judgments: int = 8192
    body_timeout_s: float = 10.0
    retry_cache_s: float = 300.0
    workers: int = 256
    log_level: str = "info"

    def __post_init__(self) -> None:
        for key in ("max_request_bytes", "max_batch", "max_candidate_chars", "workers", "max_request_judgments",
                    "max_queued_judgments", "body_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} {getattr(self, key)}: must be positive")
        if self.retry_cache_s < 0:
            raise ValueError(f"--retry_cache_s {self.retry_cache_s}: use 0 (off) or more seconds")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: must be in 0-65535")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"--log_level {self.log_level!r}: use critical, error, warning, info or debug")


SERVE_HELP = {
    "host": "interface to listen on; anything but loopback exposes the judge, so also set a token",
    "port": "TCP port (0: any free port; the default clashes with neither vLLM's 8000 nor serve_rm's 5000)",
    "token": f"DEPRECATED, visible in `ps`: use ${ENV_TOKEN} or --token_file (empty: no authentication)",
    "token_file": f"file holding the bearer token clients must send (default: ${ENV_TOKEN})",
    "max_request_bytes": "largest request body accepted (HTTP 413 above)",
    "max_batch": "most samples in one /get_reward request (HTTP 413 above)",
    "max_candidate_chars": "longest /judge candidate or /get_reward query, in characters (HTTP 413 above)",
    "max_request_judgments": "most judgments one request may ask for, samples x 2 orders x votes (HTTP 413 above)",
    "max_queued_judgments": "most judgments queued or running over all requests (HTTP 429 above)",
    "body_timeout_s": "seconds a client has to send its whole request body (HTTP 408 after)",
    "retry_cache_s": "a repeated identical request within this many seconds gets the same answer "
                     "without judging again (OpenRLHF retries; 0: off)",
    "workers": "reward calls running at once; concurrent calls reach the judge backend together",
    "log_level": "log level of the server and uvicorn (warning: failures and summaries only)",
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _str_list(data: dict, key: str, *, required: bool = True) -> list[str] | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(422, f"field {key!r} must be a list of strings")
    return value


def parse_reward_request(data: Any, cfg: ServeConfig) -> tuple[list[str], list[str], list[Any]]:
    """``(queries, prompts, labels)`` from a ``/get_reward`` body, or :class:`BadRequest`."""
    if not isinstance(data, dict):
        raise BadRequest(422, "body must be a JSON object with 'query', 'prompts' and 'labels'")
    queries = _str_list(data, "query")
    n = len(queries)
    if n > cfg.max_batch:
        raise BadRequest(413, f"{n} queries in one request; the limit is --max_batch {cfg.max_batch}")
    prompts = _str_list(data, "prompts", required=False)
    prompts = [""] * n if prompts is None else prompts
    labels = data.get("labels")
    if not isinstance(labels, list):
        raise BadRequest(422, "field 'labels' must be a list (one label per query, with 'exemplars' and "
                              "'reference')")
    if len(prompts) != n or len(labels) != n:
        raise BadRequest(422, f"'query', 'prompts' and 'labels' need one entry each; got {n}, {len(prompts)}, "
                              f"{len(labels)}")
    longest = max((len(q) for q in queries), default=0)
    if longest > cfg.max_candidate_chars:
        raise BadRequest(413, f"a query of {longest} characters; the limit is --max_candidate_chars "
                              f"{cfg.max_candidate_chars}")
    return queries, prompts, labels


def parse_judge_request(data: Any, cfg: ServeConfig) -> tuple[list[str], str, str, str]:
    """``(exemplars, prompt, response_a, response_b)`` from a ``/judge`` body, or :class:`BadRequest`."""
    if not isinstance(data, dict):
        raise BadRequest(422, "body must be a JSON object with 'exemplars', 'prompt', 'response_a', 'response_b'")
    exemplars = _str_list(data, "exemplars")
    if not exemplars or not all(e.strip() for e in exemplars):
        raise BadRequest(422, "field 'exemplars' must hold at least one non-empty text")
    prompt = data.get("prompt", "")
    fields = {"prompt": prompt, "response_a": data.get("response_a"), "response_b": data.get("response_b")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise BadRequest(422, f"field {key!r} must be a string")
        if len(value) > cfg.max_candidate_chars:
            raise BadRequest(413, f"field {key!r} has {len(value)} characters; the limit is "
                                  f"--max_candidate_chars {cfg.max_candidate_chars}")
    from .rewards.labels import has_lone_surrogate

    for key, value in {"exemplars": exemplars, **fields}.items():
        if has_lone_surrogate(value):
            raise BadRequest(422, f"field {key!r} holds a lone surrogate (text that is not valid UTF-8)")
    return exemplars, prompt, fields["response_a"], fields["response_b"]


def _timing(arrived: float) -> dict[str, str]:
    """``Server-Timing``: milliseconds from the request's arrival to its answer, as the server saw them."""
    return {"Server-Timing": f"total;dur={(time.monotonic() - arrived) * 1000:.1f}"}


class RetryCache:
    """Answers by request body: a retried request joins the computation under way or gets the
    recent answer, so OpenRLHF's retries never start judgments twice. Event-loop only."""

    def __init__(self, ttl_s: float, max_entries: int = 4096):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self.running: dict[str, asyncio.Future] = {}
        self.done: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()
        self.hits = 0

    def lookup(self, key: str) -> Any:
        """A finished answer, a running future, or None."""
        now = time.monotonic()
        while self.done and next(iter(self.done.values()))[0] < now:
            self.done.popitem(last=False)
        if key in self.done:
            self.hits += 1
            return self.done[key][1]
        if key in self.running:
            self.hits += 1
            return self.running[key]
        return None

    def store(self, key: str, value: Any) -> None:
        if self.ttl_s <= 0:
            return
        self.done[key] = (time.monotonic() + self.ttl_s, value)
        while len(self.done) > self.max_entries:
            self.done.popitem(last=False)


def make_app(reward: Any, cfg: ServeConfig | None = None) -> Any:
    """The FastAPI application serving ``reward`` (a :class:`PersRMReward`, or any object with the
    reward-plugin call and a ``judge_pair`` method for ``/judge``)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from .judges.faults import JudgeUnavailable

    cfg = cfg or ServeConfig()
    token = cfg.token.encode("utf-8")
    limiter = anyio.CapacityLimiter(cfg.workers)
    app = FastAPI(title="PersRM reward server", docs_url=None, redoc_url=None, openapi_url=None)
    stats = {"requests": 0, "samples": 0, "rejected": 0, "busy": 0, "queued_judgments": 0,
             "started": time.time()}
    retries = RetryCache(cfg.retry_cache_s)
    votes = int(getattr(reward, "votes", 1) or 1)

    def error(status: int, message: str) -> JSONResponse:
        stats["rejected"] += 1
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status in (429, 503):
            headers = {"Retry-After": "5"}
        if status in (408, 413):  # the rest of the body is not read: do not keep the connection
            headers = {"Connection": "close"}
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def read_body(request: Request) -> bytes:
        if token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # header values arrive decoded as latin-1: their bytes are what the client sent (UTF-8)
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                                     token):
                raise BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_request_bytes:
            raise BadRequest(413, f"request of {declared} bytes; the limit is --max_request_bytes "
                                  f"{cfg.max_request_bytes}")
        body = bytearray()
        try:
            with anyio.fail_after(cfg.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > cfg.max_request_bytes:
                        raise BadRequest(413, f"request over --max_request_bytes {cfg.max_request_bytes}")
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within --body_timeout_s {cfg.body_timeout_s}") \
                from None
        return bytes(body)

    def parse_json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"body is not JSON: {exc}") from None
        except RecursionError:
            raise BadRequest(400, "body is JSON nested too deeply") from None

    def unavailable(exc: Exception) -> BadRequest:
        return BadRequest(503, f"the judge is down: {exc}")

    async def admitted(key: str | None, judgments: int, compute: Any) -> Any:
        """Run ``compute`` (in a worker thread), once per body when ``key`` is given; queue-bounded;
        503 once the judge is down."""
        health = getattr(reward, "health", None)
        if health is not None and health.stopped:
            raise unavailable(JudgeUnavailable(health.stopped))
        if key is None:  # not deduplicated
            key = f"unique-{id(object())}-{time.monotonic_ns()}"
            found = None
        else:
            found = retries.lookup(key)
        if isinstance(found, asyncio.Future):
            return await asyncio.shield(found)
        if found is not None:
            return found
        if stats["queued_judgments"] + judgments > cfg.max_queued_judgments:
            stats["busy"] += 1
            raise BadRequest(429, f"{stats['queued_judgments']} judgments queued; --max_queued_judgments "
                                  f"{cfg.max_queued_judgments} would be exceeded: retry later")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        retries.running[key] = future
        stats["queued_judgments"] += judgments
        try:
            value = await anyio.to_thread.run_sync(compute, limiter=limiter)
        except JudgeUnavailable as exc:
            future.set_exception(unavailable(exc))
            raise unavailable(exc) from None
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(value)
            if not key.startswith("unique-"):
                retries.store(key, value)
            return value
        finally:
            stats["queued_judgments"] -= judgments
            retries.running.pop(key, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning when no retry waited

    def body_key(path: str, body: bytes) -> str:
        return hashlib.sha256(path.encode() + b"\0" + body).hexdigest()

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.get("/health")
    async def health() -> JSONResponse:
        judge_health = getattr(reward, "health", None)
        judge = judge_health.snapshot() if judge_health is not None else {"state": "ok"}
        backend = getattr(reward, "_judge", None)
        if backend is not None and callable(getattr(backend, "health", None)):
            try:
                judge["backend"] = backend.health()
            except Exception as exc:  # noqa: BLE001 -- health must answer
                judge["backend"] = {"error": f"{type(exc).__name__}: {exc}"}
            if judge["state"] == "ok" and judge["backend"].get("fatal"):
                judge["state"] = "degraded"
        body = {"status": judge["state"], "plugin": getattr(reward, "name", type(reward).__name__),
                "mode": getattr(reward, "mode", None), "judge": judge, "requests": stats["requests"],
                "samples": stats["samples"], "rejected": stats["rejected"], "busy": stats["busy"],
                "retried": retries.hits, "queued_judgments": stats["queued_judgments"],
                "deadline_s": getattr(reward, "deadline_s", None),
                "uptime_s": round(time.time() - stats["started"], 1)}
        return JSONResponse(body, status_code=503 if judge["state"] == "down" else 200)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        arrived = time.monotonic()
        raw = await read_body(request)
        queries, prompts, labels = parse_reward_request(parse_json(raw), cfg)
        judgments = len(queries) * 2 * votes
        if judgments > cfg.max_request_judgments:
            raise BadRequest(413, f"{len(queries)} samples x 2 orders x {votes} votes = {judgments} judgments in "
                                  f"one request; the limit is --max_request_judgments {cfg.max_request_judgments}")
        stats["requests"] += 1
        stats["samples"] += len(queries)

        def compute() -> dict[str, Any]:
            kwargs = {}
            if isinstance(getattr(reward, "deadline_s", None), (int, float)):
                # due from the request's arrival, with a little kept for answering
                kwargs["deadline"] = arrived + reward.deadline_s * 0.95
            out = reward(queries, prompts, labels, **kwargs)
            return {"rewards": list(out.rewards), "scores": list(out.scores),
                    "extra_logs": {k: list(v) for k, v in out.extra_logs.items()}}

        answer = await admitted(body_key("/get_reward", raw), judgments, compute)
        return JSONResponse(answer, headers=_timing(arrived))

    @app.post("/judge")
    async def judge(request: Request) -> JSONResponse:
        arrived = time.monotonic()
        raw = await read_body(request)
        exemplars, prompt, a, b = parse_judge_request(parse_json(raw), cfg)
        stats["requests"] += 1

        def compute() -> dict[str, Any]:
            due = getattr(reward, "deadline_s", None)
            if isinstance(due, (int, float)):
                result = reward.judge_pair(exemplars, prompt, a, b, deadline=arrived + due * 0.95)
            else:
                result = reward.judge_pair(exemplars, prompt, a, b)
            preferred = None
            if result.ok:
                preferred = ("tie" if result.score_a == result.score_b
                             else ("A" if result.score_a > result.score_b else "B"))
            return {"ok": result.ok, "scores": [result.score_a, result.score_b] if result.ok else None,
                    "preferred": preferred, "failure": result.failure, "kind": getattr(result, "kind", None),
                    "detail": result.detail, "text": result.text}

        # not deduplicated: a caller may ask the same pair again on purpose (votes)
        answer = await admitted(None, 1, compute)
        return JSONResponse(answer, headers=_timing(arrived))

    return app


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread; yields the base URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                           backlog=1024))
    thread = threading.Thread(target=server.run, name="persrm-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the reward server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(15)


# ---------------------------------------------------------------------------------- command line

def _reward_fields() -> list[dataclasses.Field]:
    from .judge_settings import JudgeSettings

    # serve_url points a training run at a persrm serve; inside the server it has no meaning.
    return [f for f in dataclasses.fields(JudgeSettings) if f.name != "serve_url"]


def _flag_type(default: Any) -> Any:
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, (int, float)):
        return type(default)
    return str


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _shown(default: Any) -> str:
    # the default as it reads in --reward_config JSON
    return json.dumps(float(default) if isinstance(default, float) else default)


def make_parser() -> argparse.ArgumentParser:
    """Flags of ``persrm serve``: server settings, then ``--reward.<field>`` for the reward."""
    parser = argparse.ArgumentParser(
        prog="persrm serve", description="Serve PersRM as an OpenRLHF remote reward model (POST /get_reward).")
    for f in dataclasses.fields(ServeConfig):
        parser.add_argument(f"--{f.name}", type=_flag_type(f.default), default=f.default,
                            help=f"{SERVE_HELP.get(f.name, '')} (default: %(default)s)")
    group = parser.add_argument_group("reward", "the persrm reward plugin (also: --reward_config JSON)")
    group.add_argument("--reward_config", default="",
                       help="JSON object of reward settings, as in $PERSRM_REWARD_CONFIG; --reward.* flags override it")
    for f in _reward_fields():  # the judge settings: help and defaults from their one definition
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = {"backend_config": json.loads, "neutral_reward": float, "failure_reward": float}.get(f.name) or _flag_type(default)
        group.add_argument(f"--reward.{f.name}", dest=f"reward__{f.name}", type=kind, default=None,
                           help=f"{f.metadata.get('help', '')} (default: {_shown(default)})")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[ServeConfig, dict[str, Any]]:
    serve = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    if serve.token:
        logger.warning("--token is visible to every user of this machine (ps, /proc); put the token in "
                       "$%s or a file given as --token_file", ENV_TOKEN)
    elif serve.token_file:
        try:
            with open(serve.token_file, encoding="utf-8") as fh:
                serve.token = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"--token_file {serve.token_file!r}: cannot read it ({exc})") from None
        if not serve.token:
            raise ValueError(f"--token_file {serve.token_file!r} is empty; write the token into it")
    else:
        serve.token = os.environ.get(ENV_TOKEN, "")
    reward: dict[str, Any] = {}
    if args.reward_config:
        try:
            reward = json.loads(args.reward_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--reward_config is not valid JSON ({exc})") from None
        if not isinstance(reward, dict):
            raise ValueError(f"--reward_config must be a JSON object, got {args.reward_config[:80]!r}")
    for key, value in vars(args).items():
        if key.startswith("reward__") and value is not None:
            reward[key[len("reward__"):]] = value
    return serve, reward


def build_reward(config: dict[str, Any]) -> Any:
    """The ``persrm`` reward from its settings; a ``ValueError`` names a bad one."""
    from .contracts import config_error
    from .rewards.persrm import PersRMReward

    try:
        return PersRMReward(**config)
    except TypeError as exc:
        raise config_error("persrm", PersRMReward, config, exc) from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def setup_logging(level: str) -> None:
    """Our log lines at ``level``; the HTTP client's per-request lines never (one per judgment)."""
    numeric = getattr(logging, level.upper(), logging.INFO) if level.lower() != "trace" else logging.DEBUG
    logging.basicConfig(level=numeric, format="[persrm serve] %(levelname)s %(message)s")
    logging.getLogger().setLevel(numeric)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``persrm serve``; returns the exit status (2 for bad flags, 1 when the judge cannot answer)."""
    args = make_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg, reward_config = config_from_args(args)
        reward = build_reward(reward_config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(cfg.host) and not cfg.token:
        logger.warning("listening on %s without a token: anyone who can reach it can use the judge; "
                       "set $%s or --token_file", cfg.host, ENV_TOKEN)
    if getattr(reward, "probe_on_start", False):
        from .judges.faults import JudgeUnavailable

        try:
            reward.probe()  # loads a local model or reaches the endpoint before accepting requests
        except JudgeUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    judge = reward.judge
    print(f"[persrm serve] judge backend {getattr(judge, 'name', '?')} ready; mode={reward.mode}; "
          f"deadline {reward.deadline_s:g}s; http://{cfg.host}:{cfg.port}/get_reward", file=sys.stderr, flush=True)
    import uvicorn

    uvicorn.run(make_app(reward, cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower(), backlog=1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
