"""Why a judge produced no output: :class:`JudgeError` subclasses with a ``kind``.

Backends return these in place of a judgment (the contract's :class:`JudgeError`, so callers
that only know the contract keep working); the ``persrm`` reward counts failures by ``kind``
(``extra_logs``, ``persrm serve``'s log and ``/health``) and a ``fatal`` one (a refused key,
an unknown model or URL) names a misconfiguration that retrying cannot fix.
"""

from __future__ import annotations

from ..contracts import JudgeError

#: Every kind a built-in backend reports; ``judge_error`` is any other backend's plain JudgeError.
ERROR_KINDS = ("timeout", "deadline", "unreachable", "server_error", "malformed_body", "rejected", "fatal",
               "judge_error")


class JudgeFault(JudgeError):
    """A :class:`JudgeError` that says what went wrong (``kind``) and whether it is ``fatal``."""

    kind: str = "judge_error"
    fatal: bool = False


class JudgeTimeout(JudgeFault):
    """The judge did not answer within the per-request ``timeout`` (after its retries)."""

    kind = "timeout"


class JudgeDeadline(JudgeFault):
    """The caller's deadline passed first; the judge call was cancelled."""

    kind = "deadline"


class JudgeUnreachable(JudgeFault):
    """Connection refused, reset or otherwise failed (after retries)."""

    kind = "unreachable"


class JudgeServerError(JudgeFault):
    """HTTP 429/5xx after retries: the server is up but failing or overloaded."""

    kind = "server_error"


class JudgeMalformed(JudgeFault):
    """Answers that are not a chat completion (after retries)."""

    kind = "malformed_body"


class JudgeRejected(JudgeFault):
    """This request was refused (HTTP 400/413/422: e.g. longer than the judge's context)."""

    kind = "rejected"


class JudgeFatal(JudgeFault):
    """The judge refuses every request: bad key (401/403), unknown model or URL (404)."""

    kind = "fatal"
    fatal = True


class JudgeUnavailable(RuntimeError):
    """The judge cannot serve (start-up probe failed, or failures stayed above the stop rule's
    threshold): the run must stop. Raised by the reward, never turned into a reward."""


def failure_kind(error: BaseException) -> str:
    """The ``kind`` of a backend's :class:`JudgeError` (``judge_error`` for a plain one)."""
    kind = getattr(error, "kind", None)
    return kind if isinstance(kind, str) and kind else "judge_error"
