"""Serving an app with uvicorn, with connection timeouts uvicorn does not have.

uvicorn closes a connection idle *between* requests (``timeout_keep_alive``), but not one that
never sends anything, nor one that sends a request's head byte by byte (h11 has no header
timeout): each holds a socket and a file descriptor for as long as the client likes, and some
thousands lock the server out. :func:`head_timeout_protocol` adds both bounds to uvicorn's own
HTTP protocol: a new connection that sends nothing is closed after ``--idle_timeout_s``, and a
client has ``--header_timeout_s``, from connecting or from its previous answer, to send a
request's line and headers (the body has ``--body_timeout_s``, enforced by the handlers).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

from .config import ServeConfig

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def head_timeout_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (h11 or httptools, as uvicorn picks) with a request-head timeout
    and an idle timeout from the first moment of a connection."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            self._head_timer: Any = None
            self._head_begun = False  # bytes of the next request's head arrived
            super().connection_made(transport)
            # uvicorn arms its idle timer only after an answer; a silent new connection gets it too
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._head_begun = self._head_begun or bool(data)
            self._await_head()

        def on_response_complete(self) -> None:
            self._head_begun = False
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _await_head(self) -> None:
            """Time the wait for a request head; stop timing once a request is being handled."""
            if self.transport.is_closing() or self._in_request():
                self._stop_head_timer()
                self._head_begun = False
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self._in_request():
                return
            if self._head_begun:  # a client that started a request hears why it is cut off
                self.transport.write(_TIMED_OUT)
            self.transport.close()

    return HeadTimeoutProtocol


def uvicorn_config(app: Any, cfg: ServeConfig, *, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", backlog=1024,
                          http=head_timeout_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.idle_timeout_s)


def _settings(app: Any) -> ServeConfig:
    state = getattr(getattr(app, "state", None), "persrm", None)
    return state.cfg if state is not None else ServeConfig()


def serve_forever(app: Any, cfg: ServeConfig | None = None) -> None:
    """Serve ``app`` (from :func:`~.app.make_app`) on ``cfg.host:cfg.port`` until interrupted."""
    import uvicorn

    cfg = cfg or _settings(app)
    server = uvicorn.Server(uvicorn_config(app, cfg, host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower()))
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on SIGINT, then re-raises the signal; under asyncio.run that can
        # surface as KeyboardInterrupt (a race with the main task ending). A stop the user asked for is
        # not an error: exit 0 once the server has shut down.
        if not getattr(server, "should_exit", False):
            raise


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread; yields the base URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, _settings(app), host=host, port=port, log_level=log_level))
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
