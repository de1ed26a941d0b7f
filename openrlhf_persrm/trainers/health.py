"""The always-on GRPO step health check: a step that cannot teach anything says why. Pure."""

from __future__ import annotations

import math
from typing import Sequence

from ..contracts import RolloutStep


def step_health(step: RolloutStep, *, estimator: str = "group_norm") -> list[str]:
    """Warnings for a rollout step whose samples give (almost) no learning signal.

    * every rollout was cut at the token limit: the rewards judge unfinished text;
    * every prompt group got identical rewards: group-relative advantages are all zero.

    >>> from openrlhf_persrm.contracts import RolloutSample as S
    >>> step = RolloutStep(1, [S("p", "r", None, 0.0, True, 0), S("p", "r", None, 0.0, True, 0)], 2, 16)
    >>> [w.split(":")[0] for w in step_health(step)]
    ['every rollout hit --rollout.max_new_tokens (16)', 'every prompt group got identical rewards']
    """
    out: list[str] = []
    samples = step.samples
    if not samples:
        return out
    if all(s.truncated for s in samples):
        limit = f" ({step.max_new_tokens})" if step.max_new_tokens else ""
        out.append(f"every rollout hit --rollout.max_new_tokens{limit}: all {len(samples)} responses were cut "
                   "before they ended, so the rewards judge unfinished text; raise --rollout.max_new_tokens")
    groups = [g for g in step.groups() if len(g) > 1]
    if groups and step.n_samples_per_prompt > 1 and all(_spread([samples[i].reward for i in g]) == 0 for g in groups):
        values = sorted({round(samples[i].reward, 4) for g in groups for i in g})
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        out.append(f"every prompt group got identical rewards: no reward spread across the whole step (rewards: "
                   f"{shown}), so {estimator} advantages are all zero and this step learns nothing; check the "
                   "reward (a format it never meets, a judge that always fails), raise --rollout.temperature or "
                   "--rollout.n_samples_per_prompt")
    return out


def _spread(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return (max(finite) - min(finite)) if finite else 0.0
