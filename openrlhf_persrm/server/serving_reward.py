"""``POST /get_reward``: OpenRLHF's remote reward-model protocol over the ``persrm`` reward."""

from __future__ import annotations

from typing import Any

from ..rewards.persrm import EXTRA_LOG_KEYS
from .admission import body_key
from .http import json_response, read_body
from .wire import BadRequest, overdue_reward_answer, parse_json, parse_reward_request, reward_answer


class RewardHandler:
    """``{"query", "prompts", "labels"}`` -> ``{"rewards", "scores", "extra_logs"}``, within the
    reward's deadline from the request's arrival; a retried body joins the computation under way."""

    def __init__(self, state: Any):
        self.state = state
        reward = state.reward
        self.votes = int(getattr(reward, "votes", 1) or 1)
        failure = getattr(reward, "failure_reward", -1.0)
        self.failure_reward = float(failure) if isinstance(failure, (int, float)) else -1.0

    async def get_reward(self, request: Any) -> Any:
        state = self.state
        clock = state.clock()
        raw = await read_body(request, state.cfg, state.token)
        queries, prompts, labels = parse_reward_request(parse_json(raw), state.cfg)
        n = len(queries)
        judgments = n * 2 * self.votes
        if judgments > state.cfg.max_request_judgments:
            raise BadRequest(413, f"{n} samples x 2 orders x {self.votes} votes = {judgments} judgments in one "
                                  f"request; the limit is --max_request_judgments {state.cfg.max_request_judgments}")
        state.gate.check()
        state.stats.requests += 1
        state.stats.samples += n

        def compute() -> dict[str, Any]:
            return reward_answer(state.reward(queries, prompts, labels, **clock.reward_kwargs()))

        answer = await state.admission.answer(
            body_key("/get_reward", raw), judgments, compute, clock,
            overdue=lambda: overdue_reward_answer(n, self.failure_reward, EXTRA_LOG_KEYS))
        return json_response(answer, headers=clock.timing())
