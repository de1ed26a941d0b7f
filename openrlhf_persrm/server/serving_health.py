"""``GET /health`` and the gate in front of the judge: 503 while it is down, recovery probes.

Without the token (when the server has one) ``/health`` answers liveness only,
``{"status": "ok" | "degraded" | "down"}`` (HTTP 503 when down); with it, or on a server without
a token, the details: the judge's state now (recent failure rate, calls in flight and whether
they hang, the breaker), the backend's own view (its ``base_url`` among them) and the server's
counters.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .http import authorized, json_response
from .wire import BadRequest

logger = logging.getLogger("openrlhf_persrm.serve")


class JudgeGate:
    """Refuses work while the reward's judge is declared down, and meanwhile runs the breaker's
    recovery probes (the reward's start-up probe, on a background thread) when they are due."""

    def __init__(self, reward: Any):
        self.health = getattr(reward, "health", None)
        self.probe = getattr(reward, "probe", None)
        self._probing = threading.Lock()

    def check(self) -> None:
        """Raise 503 with the cause while the judge is down (and start a probe if one is due)."""
        if self.health is not None and self.health.stopped:
            cause = self.health.stopped
            self.recover_in_background()
            raise BadRequest(503, f"the judge is down: {cause}")

    def recover_in_background(self) -> None:
        if self.health is None or not callable(self.probe) or not self.health.probe_due:
            return
        if not self._probing.acquire(blocking=False):  # one probe at a time
            return
        threading.Thread(target=self._recover, name="persrm-judge-probe", daemon=True).start()

    def _recover(self) -> None:
        try:
            self.health.recover(self.probe)
        finally:
            self._probing.release()


class HealthHandler:
    """``GET /health``."""

    def __init__(self, state: Any):
        self.state = state

    async def health(self, request: Any) -> Any:
        state = self.state
        state.gate.recover_in_background()
        health = getattr(state.reward, "health", None)
        hang_after_s = state.deadline_s / 3 if state.deadline_s else None  # well before the calls fail
        judge = health.snapshot(hang_after_s) if health is not None else {"state": "ok"}
        backend = getattr(state.reward, "_judge", None)
        if backend is not None and callable(getattr(backend, "health", None)):
            try:
                judge["backend"] = backend.health()
            except Exception as exc:  # noqa: BLE001 -- health must answer
                judge["backend"] = {"error": f"{type(exc).__name__}: {exc}"}
            if judge["state"] == "ok" and judge["backend"].get("fatal"):
                judge["state"] = "degraded"
        status = 503 if judge["state"] == "down" else 200
        if not authorized(request, state.token):
            return json_response({"status": judge["state"]}, status)
        admission, stats = state.admission, state.stats
        body = {"status": judge["state"], "plugin": getattr(state.reward, "name", type(state.reward).__name__),
                "mode": getattr(state.reward, "mode", None), "judge": judge, "requests": stats.requests,
                "samples": stats.samples, "rejected": stats.rejected, "busy": admission.busy,
                "overdue": admission.overdue, "retried": admission.retries.hits,
                "queued_judgments": admission.queued_judgments, "deadline_s": state.deadline_s,
                "uptime_s": stats.uptime_s()}
        return json_response(body, status)
