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
    ``{"status": "ok" | "degraded" | "down"}``, HTTP 503 when the judge is down; with the token
    (or on a server without one) also the details: the judge's state now (its failure rate over
    the latest samples, calls in flight and whether they hang, the breaker), the backend (its URL
    among them) and the server's counters.

Time: every answer leaves within the reward's ``deadline_s`` (default 90 s, inside OpenRLHF's
180 s client timeout) of the request's arrival, whatever runs behind it (label preparation, token
counting, a judge that ignores its deadline): judgments not finished by then are cancelled, and
samples without a judgment score the reward's ``failure_reward``. A request OpenRLHF retries (same
body) joins the judging already under way, bounded by its own deadline, or gets its answer again.
When the judge is declared down (the stop rule: failures above ``stop_failure_rate`` for
``stop_after_steps`` windows), ``/get_reward`` and ``/judge`` answer 503 with the cause, which
stops OpenRLHF's run; meanwhile the server probes the judge as at start-up, at growing intervals,
and serves again once a probe answers (a circuit breaker, logged), so an outage ends the runs that
meet it, not every later one. Start-up judges a probe pair first and exits (status 1, cause named)
when the judge cannot answer.

Limits: bytes, samples and candidate length per request, judgments per request
(``--max_request_judgments``) and judgments queued over all requests (``--max_queued_judgments``;
HTTP 429 when full); a request's head must arrive within ``--header_timeout_s`` and its body within
``--body_timeout_s`` (HTTP 408), and a silent connection is closed after ``--idle_timeout_s``.
Malformed input gets a 4xx with a message (deeply nested JSON and over-long numbers included); a
sample with text that is not valid UTF-8 (raw bytes or a lone surrogate) fails alone.

It listens on 127.0.0.1 unless told otherwise. With a token (``$PERSRM_SERVE_TOKEN`` or
``--token_file``; never on the command line, where ``ps`` shows it) every request needs
``Authorization: Bearer <token>``, but ``/health`` answers its bare status without (OpenRLHF's
own client sends none: keep such a server on loopback or behind a proxy that adds it). Each
request runs the plugin in a worker thread, so concurrent requests reach the judge backend
together and it batches them.

The application lives in :mod:`openrlhf_persrm.server` (one module per concern); this module is
the command line. Starlette and uvicorn are imported when the server is built (``pip install
"openrlhf-persrm[serve]"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import sys
from typing import Any, Sequence

from .server.config import DEFAULT_PORT, ENV_TOKEN, SERVE_HELP, ServeConfig
from .server.protocol import running_server, serve_forever
from .server.wire import BadRequest, parse_judge_request, parse_reward_request

__all__ = ["ServeConfig", "SERVE_HELP", "ENV_TOKEN", "DEFAULT_PORT", "BadRequest", "parse_reward_request",
           "parse_judge_request", "make_app", "running_server", "serve_forever", "make_parser", "config_from_args",
           "build_reward", "setup_logging", "main"]

logger = logging.getLogger("openrlhf_persrm.serve")


def make_app(reward: Any, cfg: ServeConfig | None = None) -> Any:
    """The ASGI application serving ``reward`` (see :func:`openrlhf_persrm.server.app.make_app`)."""
    from .server.app import make_app as build

    return build(reward, cfg)


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
    serve_forever(make_app(reward, cfg), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
