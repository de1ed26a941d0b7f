"""``persrm_order_consistency``: stage 2 rewards a verdict that holds when A and B swap.

``persrm_rl`` (``orders="both"``) writes every pair twice, real text at A and at B; its labels
carry ``pair_id`` and ``chosen_position``. This plugin

* keeps both orders of a pair in the same rollout step (:meth:`twin_key`; the wrapper then needs an
  even ``--rollout.batch_size`` and no dynamic filtering), and
* shapes each sample's reward by how often its verdict (which *text* it prefers, read from its
  ``<answer>``) agrees with the verdicts of the samples of the twin order:
  ``reward += bonus * agree - penalty * disagree``, ``agree`` and ``disagree`` being the shares of
  twin samples with the same and with the opposite readable verdict. An unreadable or tied verdict
  agrees with nothing (it gets no bonus; with ``penalty_unreadable`` it counts as disagreeing).

Logged per step: ``position_consistency`` (the share of (sample, twin sample) couples with the
same readable verdict) and ``twins_in_step`` (the share of samples whose twin order is in the step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..contracts import RolloutStep, StepResult, TrainerPlugin
from ..judge_format import parse_judgment, scores_for


def verdict(response: str, chosen_position: str, *, require_reasoning: bool = True) -> str | None:
    """``"real"``, ``"negative"`` or None (unreadable, or a tie) for one stage-2 response.

    >>> verdict("<think>x</think><answer>[8, 3]</answer>", "B")
    'negative'
    """
    scores = scores_for(parse_judgment(response, require_reasoning=require_reasoning), chosen_position)
    if scores is None or scores[0] == scores[1]:
        return None
    return "real" if scores[0] > scores[1] else "negative"


@dataclass
class OrderConsistency(TrainerPlugin):
    """Order-consistency shaping for stage 2 (see the module docstring).

    Args:
        bonus: added to a sample's reward times the share of twin samples that agree with it.
        penalty: subtracted times the share of twin samples that disagree.
        penalty_unreadable: count an unreadable or tied verdict as disagreeing with every twin.
        require_reasoning: verdicts need ``<think>...</think>`` (as the rule reward demands).
    """

    name: ClassVar[str] = "persrm_order_consistency"
    stages: ClassVar[tuple[str, ...]] = ("rl",)

    bonus: float = 0.5
    penalty: float = 0.0
    penalty_unreadable: bool = False
    require_reasoning: bool = True

    def __post_init__(self) -> None:
        if self.bonus < 0 or self.penalty < 0:
            raise ValueError(f"persrm_order_consistency: bonus={self.bonus}, penalty={self.penalty}; both are "
                             "magnitudes (>= 0): the bonus is added, the penalty subtracted")

    def twin_key(self, *, label: Any) -> str | None:
        from ..rewards.labels import LabelError, label_object

        try:
            pid = label_object(label, "'pair_id'").get("pair_id")
        except LabelError:
            return None
        return None if pid is None else f"pair:{pid}"

    def on_rollout_step(self, *, step: RolloutStep) -> StepResult:
        verdicts = {}
        rewards = list(step.rewards)
        with_twin = agree_total = couples = 0
        for orders in step.pairs().values():
            for pos, idx in orders.items():
                for i in idx:
                    verdicts[i] = verdict(step.samples[i].response, pos, require_reasoning=self.require_reasoning)
            if not orders["A"] or not orders["B"]:
                continue
            for pos, twin in (("A", "B"), ("B", "A")):
                for i in orders[pos]:
                    with_twin += 1
                    mine = verdicts[i]
                    others = [verdicts[j] for j in orders[twin]]
                    agree = sum(mine is not None and v == mine for v in others) / len(others)
                    if mine is None:
                        disagree = 1.0 if self.penalty_unreadable else 0.0
                    else:
                        disagree = sum(v is not None and v != mine for v in others) / len(others)
                    rewards[i] += self.bonus * agree - self.penalty * disagree
            for i in orders["A"]:
                for j in orders["B"]:
                    couples += 1
                    agree_total += verdicts[i] is not None and verdicts[i] == verdicts[j]
        n = len(step.samples)
        return StepResult(rewards, {"position_consistency": agree_total / couples if couples else 0.0,
                                    "twins_in_step": with_twin / n if n else 0.0})
