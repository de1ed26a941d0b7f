"""HTTP plumbing shared by the handlers: the bearer token, bounded body reading, JSON answers."""

from __future__ import annotations

import hmac
from typing import Any

import anyio
from starlette.responses import Response

from .config import ServeConfig
from .wire import BadRequest, render_json


class JSONAnswer(Response):
    """A JSON response that never fails to render (see :func:`~.wire.render_json`)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return render_json(content)


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONAnswer:
    return JSONAnswer(content, status_code=status, headers=headers)


def error_response(status: int, message: str) -> JSONAnswer:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status in (429, 503):
        headers = {"Retry-After": "5"}
    if status in (408, 413):  # the rest of the body is not read: do not keep the connection
        headers = {"Connection": "close"}
    return json_response({"detail": message}, status, headers)


def authorized(request: Any, token: bytes) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (always, when there is no token)."""
    if not token:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # header values arrive decoded as latin-1: their bytes are what the client sent (UTF-8)
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"), token)


async def read_body(request: Any, cfg: ServeConfig, token: bytes) -> bytes:
    """The request's body once its token checks out: at most ``--max_request_bytes`` (413), within
    ``--body_timeout_s`` (408)."""
    if not authorized(request, token):
        raise BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
    declared = request.headers.get("content-length")
    if (declared is not None and declared.isascii() and declared.isdigit()
            and (len(declared) > 18 or int(declared) > cfg.max_request_bytes)):
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
