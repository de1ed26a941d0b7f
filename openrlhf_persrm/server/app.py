"""The application: explicit server state and the routes to its handlers, one module each."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from .admission import Admission, RequestClock
from .config import ServeConfig
from .http import error_response
from .serving_health import HealthHandler, JudgeGate
from .serving_judge import JudgeHandler
from .serving_reward import RewardHandler
from .wire import BadRequest


@dataclass
class ServerStats:
    requests: int = 0
    samples: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.time)

    def uptime_s(self) -> float:
        return round(time.time() - self.started, 1)


@dataclass
class ServerState:
    """Everything the handlers share: the reward, the settings, the counters, admission and the gate."""

    reward: Any
    cfg: ServeConfig
    stats: ServerStats = field(default_factory=ServerStats)
    token: bytes = field(init=False)
    deadline_s: float | None = field(init=False)
    admission: Admission = field(init=False)
    gate: JudgeGate = field(init=False)

    def __post_init__(self) -> None:
        self.token = self.cfg.token.encode("utf-8")
        self.deadline_s = RequestClock.deadline_of(self.reward)
        self.admission = Admission(self.cfg, getattr(self.reward, "health", None))
        self.gate = JudgeGate(self.reward)

    def clock(self) -> RequestClock:
        """A new request's clock, started now."""
        return RequestClock.start(self.deadline_s)


def make_app(reward: Any, cfg: ServeConfig | None = None) -> Any:
    """The ASGI application serving ``reward`` (a :class:`~openrlhf_persrm.rewards.persrm.PersRMReward`,
    or any object with the reward-plugin call and a ``judge_pair`` method for ``/judge``)."""
    state = ServerState(reward, cfg or ServeConfig())

    async def bad_request(request: Any, exc: BadRequest) -> Any:
        state.stats.rejected += 1
        return error_response(exc.status, exc.message)

    # plain routes: each handler reads the request itself (bounded) and answers it
    app = Starlette(routes=[Route("/get_reward", RewardHandler(state).get_reward, methods=["POST"]),
                            Route("/judge", JudgeHandler(state).judge, methods=["POST"]),
                            Route("/health", HealthHandler(state).health, methods=["GET"])],
                    exception_handlers={BadRequest: bad_request})
    app.state.persrm = state  # running_server reads the settings (timeouts) from here
    return app
