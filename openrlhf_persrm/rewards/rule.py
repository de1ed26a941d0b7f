"""``persrm_rule``: the verifiable reward of PersRM stage 2 (GRPO).

The policy being trained is the judge itself: for a judge-format prompt whose label says
where the person's real text was shown, a strictly correct order earns ``correct_reward``,
a wrong order or a tie ``wrong_reward``, and an output the parser cannot read
``format_penalty``. It never raises: a bad label is logged as an error and earns the
format penalty.

The format is what the method is named for, so it cannot be skipped: empty reasoning
(``<think></think>``), reasoning shorter than ``min_reasoning_words`` words, and any text after
``</answer>`` (end-of-turn markers aside) are format failures, counted by kind in
``extra_logs`` (``format_fail_<kind>``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..contracts import RewardOutput
from ..judge_format import FailureKind, Judgment, parse_judgment, scores_for
from .labels import LabelError, clean_response, parse_label, split_response

logger = logging.getLogger(__name__)

EXTRA_LOG_KEYS = ("accuracy", "format_ok", "margin", "reasoning_len", "tie",
                  *(f"format_fail_{k.value}" for k in FailureKind))


@dataclass
class RuleReward:
    """Rule reward for PersRM judgments.

    Args:
        correct_reward: reward when the real text gets the strictly higher score.
        wrong_reward: reward for a wrong order or a tie.
        format_penalty: reward when the output cannot be parsed (or the label is bad).
            Defaults below ``wrong_reward`` so a parsable wrong verdict beats an
            unparsable one, keeping the format alive under GRPO.
        require_reasoning: demand ``<think>...</think>`` before the answer.
        min_reasoning_words: fewer words of reasoning are a format failure (default 1: empty
            reasoning fails; raise it, e.g. to 20, to refuse token reasoning as well).
        allow_trailing_text: accept text after ``</answer>`` (default: a format failure).

    Example::

        >>> r = RuleReward()
        >>> out = r(["<prompt><think>curt, like them</think><answer>[8, 3]</answer><|im_end|>"], ["<prompt>"],
        ...         [{"chosen_position": "A"}])
        >>> out.rewards, out.extra_logs["accuracy"]
        ([1.0], [1.0])
    """

    name = "persrm_rule"

    correct_reward: float = 1.0
    wrong_reward: float = -1.0
    format_penalty: float = -1.5
    require_reasoning: bool = True
    min_reasoning_words: int = 1
    allow_trailing_text: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.min_reasoning_words, bool) or not isinstance(self.min_reasoning_words, int) \
                or self.min_reasoning_words < 0:
            raise ValueError(f"persrm_rule: min_reasoning_words={self.min_reasoning_words!r}; use a whole number "
                             ">= 0 (set it in --reward_plugin_config)")
        for key in ("correct_reward", "wrong_reward", "format_penalty"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"persrm_rule: {key}={value!r} must be a finite number "
                                 f"(set it in --reward_plugin_config)")
        if self.correct_reward <= self.wrong_reward:
            raise ValueError(f"persrm_rule: correct_reward={self.correct_reward} must exceed "
                             f"wrong_reward={self.wrong_reward}; raise correct_reward or lower wrong_reward")

    # Scores in [0, 1] for OpenRLHF's dynamic filtering: 1 for a correct verdict, else 0.
    def score_one(self, response: str, label: Any) -> tuple[float, float, dict[str, float]]:
        """``(reward, score, extra_logs)`` for one response. Never raises."""
        logs = dict.fromkeys(EXTRA_LOG_KEYS, 0.0)
        try:
            pos = parse_label(label)["chosen_position"]
        except LabelError as exc:
            logger.error("persrm_rule: bad label, giving the format penalty: %s", exc)
            return self.format_penalty, 0.0, logs
        result = parse_judgment(clean_response(response), require_reasoning=self.require_reasoning,
                                min_reasoning_words=self.min_reasoning_words,
                                allow_trailing=self.allow_trailing_text)
        logs["reasoning_len"] = float(len(result.reasoning.split()))
        if not isinstance(result, Judgment):
            logs[f"format_fail_{result.kind.value}"] = 1.0
            logger.debug("persrm_rule: unreadable judgment (%s: %s)", result.kind.value, result.detail)
            return self.format_penalty, 0.0, logs
        real, other = scores_for(result, pos)
        logs["format_ok"] = 1.0
        logs["margin"] = float(real - other)
        if real > other:
            logs["accuracy"] = 1.0
            return self.correct_reward, 1.0, logs
        logs["tie"] = float(real == other)
        return self.wrong_reward, 0.0, logs

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                 **kwargs: Any) -> RewardOutput:
        rewards, scores = [], []
        extra: dict[str, list[float]] = {k: [] for k in EXTRA_LOG_KEYS}
        for query, prompt, label in zip(queries, prompts, labels):
            try:
                reward, score, logs = self.score_one(split_response(query, prompt), label)
            except Exception:  # defensive: OpenRLHF would turn an exception into a silent None
                logger.exception("persrm_rule: unexpected error; giving the format penalty")
                reward, score, logs = self.format_penalty, 0.0, {k: 0.0 for k in EXTRA_LOG_KEYS}
            rewards.append(float(reward))
            scores.append(float(score))
            for key in EXTRA_LOG_KEYS:
                extra[key].append(logs[key])
        return RewardOutput(rewards, scores, extra)
