"""Settings of the HTTP server itself (the reward has its own, ``--reward.*``). Cheap to import."""

from __future__ import annotations

from dataclasses import dataclass

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
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    retry_cache_s: float = 300.0
    workers: int = 256
    log_level: str = "info"

    def __post_init__(self) -> None:
        for key in ("max_request_bytes", "max_batch", "max_candidate_chars", "workers", "max_request_judgments",
                    "max_queued_judgments", "body_timeout_s", "header_timeout_s", "idle_timeout_s"):
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
    "header_timeout_s": "seconds a client has to send a request's line and headers, from connecting or from its "
                        "previous answer (the connection is closed after)",
    "idle_timeout_s": "a connection that sends nothing for this many seconds (new, or between requests) is closed",
    "retry_cache_s": "a repeated identical request within this many seconds gets the same answer "
                     "without judging again (OpenRLHF retries; 0: off)",
    "workers": "reward calls running at once; concurrent calls reach the judge backend together",
    "log_level": "log level of the server and uvicorn (warning: failures and summaries only)",
}
