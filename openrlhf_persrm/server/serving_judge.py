"""``POST /judge``: one raw pairwise judgment."""

from __future__ import annotations

from typing import Any

from .http import json_response, read_body
from .wire import judge_answer, overdue_judge_answer, parse_json, parse_judge_request


class JudgeHandler:
    """``{"exemplars", "prompt", "response_a", "response_b"}`` -> ``{"ok", "scores", "preferred",
    "failure", "kind", "detail", "text"}``, within the reward's deadline from the request's arrival."""

    def __init__(self, state: Any):
        self.state = state

    async def judge(self, request: Any) -> Any:
        state = self.state
        clock = state.clock()
        raw = await read_body(request, state.cfg, state.token)
        exemplars, prompt, a, b = parse_judge_request(parse_json(raw), state.cfg)
        state.gate.check()
        state.stats.requests += 1

        def compute() -> dict[str, Any]:
            return judge_answer(state.reward.judge_pair(exemplars, prompt, a, b, **clock.reward_kwargs()))

        # not deduplicated (key None): a caller may ask the same pair again on purpose (votes)
        answer = await state.admission.answer(None, 1, compute, clock, overdue=overdue_judge_answer)
        return json_response(answer, headers=clock.timing())
