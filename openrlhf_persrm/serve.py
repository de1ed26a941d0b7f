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
    "failure", "detail", "text"}``.
``GET /health``
    ``{"status": "ok", ...}``; needs no token.

It listens on 127.0.0.1 unless told otherwise. With ``--token`` (or ``$PERSRM_SERVE_TOKEN``)
every request but ``/health`` needs ``Authorization: Bearer <token>`` (OpenRLHF's own client
sends none: keep such a server on loopback or behind a proxy that adds it). Requests are
limited in bytes, in samples per batch and in candidate length; malformed ones get a 4xx
with a message. Each request runs the plugin in a worker thread, so concurrent requests
reach the judge backend together and it batches them (the ``local`` backend decodes them in
one batch; the ``openai`` backend keeps them in flight at once on the served model).
Judge failures and timeouts never fail a request: they give the neutral reward, counted in
``extra_logs``.

FastAPI and uvicorn are imported when the server is built (``pip install
"openrlhf-persrm[serve]"``).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (``Request``,
# imported inside make_app so this module stays cheap) as live objects.
import argparse
import contextlib
import dataclasses
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


@dataclass
class ServeConfig:
    """Settings of the HTTP server itself (the reward has its own, ``--reward.*``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str = ""
    max_request_bytes: int = 8 << 20
    max_batch: int = 512
    max_candidate_chars: int = 100_000
    workers: int = 256
    log_level: str = "info"

    def __post_init__(self) -> None:
        for key in ("max_request_bytes", "max_batch", "max_candidate_chars", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} {getattr(self, key)}: must be positive")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: must be in 0-65535")


SERVE_HELP = {
    "host": "interface to listen on; anything but loopback exposes the judge, so also set --token",
    "port": "TCP port (0: any free port)",
    "token": f"bearer token clients must send (default: ${ENV_TOKEN}; empty: no authentication)",
    "max_request_bytes": "largest request body accepted (HTTP 413 above)",
    "max_batch": "most samples in one /get_reward request (HTTP 413 above)",
    "max_candidate_chars": "longest /judge candidate or /get_reward query, in characters (HTTP 413 above)",
    "workers": "reward calls running at once; concurrent calls reach the judge backend together",
    "log_level": "uvicorn log level",
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
    return exemplars, prompt, fields["response_a"], fields["response_b"]


def make_app(reward: Any, cfg: ServeConfig | None = None) -> Any:
    """The FastAPI application serving ``reward`` (a :class:`PersRMReward`, or any object with the
    reward-plugin call and a ``judge_pair`` method for ``/judge``)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    cfg = cfg or ServeConfig()
    token = cfg.token.encode()
    limiter = anyio.CapacityLimiter(cfg.workers)
    app = FastAPI(title="PersRM reward server", docs_url=None, redoc_url=None, openapi_url=None)
    stats = {"requests": 0, "samples": 0, "rejected": 0, "started": time.time()}

    def error(status: int, message: str) -> JSONResponse:
        stats["rejected"] += 1
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def read_json(request: Request) -> Any:
        if token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                raise BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_request_bytes:
            raise BadRequest(413, f"request of {declared} bytes; the limit is --max_request_bytes "
                                  f"{cfg.max_request_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_request_bytes:
                raise BadRequest(413, f"request over --max_request_bytes {cfg.max_request_bytes}")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"body is not JSON: {exc}") from None

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "plugin": getattr(reward, "name", type(reward).__name__),
                "mode": getattr(reward, "mode", None), "requests": stats["requests"], "samples": stats["samples"],
                "rejected": stats["rejected"], "uptime_s": round(time.time() - stats["started"], 1)}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        queries, prompts, labels = parse_reward_request(await read_json(request), cfg)
        stats["requests"] += 1
        stats["samples"] += len(queries)
        out = await anyio.to_thread.run_sync(reward, queries, prompts, labels, limiter=limiter)
        return JSONResponse({"rewards": list(out.rewards), "scores": list(out.scores),
                             "extra_logs": {k: list(v) for k, v in out.extra_logs.items()}})

    @app.post("/judge")
    async def judge(request: Request) -> JSONResponse:
        exemplars, prompt, a, b = parse_judge_request(await read_json(request), cfg)
        stats["requests"] += 1
        result = await anyio.to_thread.run_sync(reward.judge_pair, exemplars, prompt, a, b, limiter=limiter)
        preferred = None
        if result.ok:
            preferred = "tie" if result.score_a == result.score_b else ("A" if result.score_a > result.score_b else "B")
        return JSONResponse({"ok": result.ok, "scores": [result.score_a, result.score_b] if result.ok else None,
                             "preferred": preferred, "failure": result.failure, "detail": result.detail,
                             "text": result.text})

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
    from .rewards.persrm import PersRMReward

    return [f for f in dataclasses.fields(PersRMReward) if f.init]


REWARD_HELP = {
    "endpoint": "OpenAI-compatible server with the judge, e.g. http://127.0.0.1:8000 (vllm serve)",
    "served_model": "model name on that server (default: the first it lists)",
    "api_key_env": "environment variable holding that server's API key",
    "model": "local judge checkpoint (CPU, batched), or smollm2-135m-instruct",
    "backend": "judge backend name, pkg.mod:Class or file.py[:Class] (instead of endpoint/model)",
    "backend_config": "JSON object of backend keyword arguments",
    "mode": "score_diff, win_rate or pointwise",
    "votes": "judgments per A/B order (test-time voting; needs temperature > 0)",
    "temperature": "judge sampling temperature",
    "max_new_tokens": "tokens the judge may write",
    "max_response_chars": "policy response and reference are cut to this many characters (counted)",
    "max_prompt_tokens": "judge prompt budget; exemplars are dropped to fit",
    "chars_per_token": "token estimate for judges that cannot count tokens",
    "parse_retries": "extra sampled attempts for unreadable judgments",
    "retry_temperature": "temperature of those attempts",
    "neutral_reward": "reward of a sample the judge could not score",
    "require_reasoning": "demand <think>...</think> before the answer",
    "timeout": "seconds per judge request",
    "seed": "base seed of the judge's sampling",
}


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
    for f in _reward_fields():
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = json.loads if f.name == "backend_config" else _flag_type(default)
        group.add_argument(f"--reward.{f.name}", dest=f"reward__{f.name}", type=kind, default=None,
                           help=f"{REWARD_HELP.get(f.name, '')} (default: {default!r})")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[ServeConfig, dict[str, Any]]:
    serve = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    if not serve.token:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``persrm serve``; returns the exit status (2 for bad flags)."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[persrm serve] %(message)s")
    try:
        cfg, reward_config = config_from_args(args)
        reward = build_reward(reward_config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(cfg.host) and not cfg.token:
        logger.warning("listening on %s without a token: anyone who can reach it can use the judge; "
                       "set --token or $%s", cfg.host, ENV_TOKEN)
    judge = reward.judge  # load a local model (or open the client) before accepting requests
    logger.info("judge backend %s ready; mode=%s; http://%s:%d/get_reward", getattr(judge, "name", "?"),
                reward.mode, cfg.host, cfg.port)
    import uvicorn

    uvicorn.run(make_app(reward, cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level, backlog=1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
