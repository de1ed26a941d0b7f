"""What goes over the wire: request bodies in, answers out. Pure functions, no I/O.

A body is decoded so that no client input can raise anything but :class:`BadRequest` (a 4xx
with a message): bytes that are not UTF-8 become lone surrogates (``surrogateescape``), which
fail the one sample holding them, not the request; JSON nested past the parser's depth and
integers past Python's 4,300-digit conversion limit are a 400. Answers are rendered as UTF-8
whatever the judge wrote (a lone surrogate in its output becomes U+FFFD).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from .config import ServeConfig

_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRequest(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body, or :class:`BadRequest` (400).

    >>> parse_json(b'{"query": ["caf\\xff"]}')["query"][0].encode("utf-8", "surrogateescape")
    b'caf\\xff'
    >>> parse_json(b"[" * 100_000)
    Traceback (most recent call last):
    ...
    openrlhf_persrm.server.wire.BadRequest: body is JSON nested too deeply
    """
    try:
        text = body.decode(json.detect_encoding(body), "surrogateescape")
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(400, "body is JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise BadRequest(400, f"body is not JSON text: {exc}") from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise BadRequest(400, "body holds a number of more than 4300 digits") from None


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
    from ..rewards.labels import has_lone_surrogate

    for key, value in {"exemplars": exemplars, **fields}.items():
        if has_lone_surrogate(value):
            raise BadRequest(422, f"field {key!r} holds a lone surrogate (text that is not valid UTF-8)")
    return exemplars, prompt, fields["response_a"], fields["response_b"]


# ------------------------------------------------------------------------------------ answers

def reward_answer(out: Any) -> dict[str, Any]:
    """OpenRLHF's ``/get_reward`` answer from a :class:`~openrlhf_persrm.contracts.RewardOutput`."""
    return {"rewards": list(out.rewards), "scores": list(out.scores),
            "extra_logs": {k: list(v) for k, v in out.extra_logs.items()}}


def overdue_reward_answer(n: int, failure_reward: float, log_keys: Sequence[str]) -> dict[str, Any]:
    """The answer for ``n`` samples whose computation missed the request's deadline: each gets the
    failure reward and counts as a ``deadline`` failure, as a sample whose judgments ran out of time."""
    logs = {k: [0.0] * n for k in log_keys}
    logs["judge_failed"] = logs["judge_fail_deadline"] = [1.0] * n
    return {"rewards": [failure_reward] * n, "scores": [(failure_reward + 1) / 2] * n, "extra_logs": logs}


def judge_answer(result: Any) -> dict[str, Any]:
    """The ``/judge`` answer from a :class:`~openrlhf_persrm.rewards.persrm.JudgedPair`."""
    preferred = None
    if result.ok:
        preferred = "tie" if result.score_a == result.score_b else ("A" if result.score_a > result.score_b else "B")
    return {"ok": result.ok, "scores": [result.score_a, result.score_b] if result.ok else None,
            "preferred": preferred, "failure": result.failure, "kind": getattr(result, "kind", None),
            "detail": result.detail, "text": result.text}


def overdue_judge_answer() -> dict[str, Any]:
    """The ``/judge`` answer when the judgment missed the request's deadline."""
    return {"ok": False, "scores": None, "preferred": None, "failure": "judge_error", "kind": "deadline",
            "detail": "no judgment before the deadline", "text": ""}


def render_json(content: Any) -> bytes:
    """UTF-8 JSON of an answer; a lone surrogate (a judge's broken output) becomes U+FFFD.

    >>> render_json({"text": "ok \\ud800"}).decode()
    '{"text":"ok \\ufffd"}'
    """
    text = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")
