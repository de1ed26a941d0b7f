"""``persrm_eval``: judge accuracy on validation pairs while training (both stages).

Every ``eval_steps`` steps the model being trained judges each validation pair twice, real
text at A and at B, greedily (through the vLLM / CPU engines in ``train_ppo_ray``, through
``generate`` on the model in ``train_sft``), and reports, with OpenRLHF's own logging:

``eval_persrm_accuracy``
    the share of judgments that score the real text strictly higher (failures and ties count
    as wrong), as ``persrm eval`` computes it (:mod:`openrlhf_persrm.eval.metrics`);
``eval_persrm_position_consistency``
    the share of pairs whose two judgments prefer the same text;
``eval_persrm_format_failure_rate``, ``eval_persrm_tie_rate``.

``eval_persrm_accuracy`` is the best-checkpoint metric: the checkpoint where it is highest is
kept (``train_ppo_ray``: OpenRLHF's ``best_global_stepN``; ``train_sft``:
``<ckpt.path>/best_global_stepN_hf`` with ``best_checkpoint.json``).

A recipe configures it with ``pairs``, ``eval_steps``, ``limit``, ``max_new_tokens``, ``batch_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..contracts import GenerateFn, TrainerPlugin

PREFIX = "eval_persrm_"


@dataclass
class PersRMEval(TrainerPlugin):
    """Validation-pair evaluation during training (see the module docstring).

    Args:
        pairs: PersRM pair JSONL with the validation pairs (relative paths are resolved where the
            launcher starts).
        eval_steps: evaluate every this many global steps.
        limit: evaluate the first ``limit`` pairs only (0: all).
        max_new_tokens: tokens the model may write per judgment.
        batch_size: judgments generated together.
        require_reasoning: a judgment needs ``<think>...</think>`` to be readable (as in training).
        best_metric: the metric that picks the best checkpoint ("" to keep none).
    """

    name: ClassVar[str] = "persrm_eval"
    stages: ClassVar[tuple[str, ...]] = ("sft", "rl")

    pairs: str = ""
    eval_steps: int = 1
    limit: int = 0
    max_new_tokens: int = 512
    batch_size: int = 8
    require_reasoning: bool = True
    best_metric: str | None = PREFIX + "accuracy"
    _records: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("persrm_eval: set pairs, a PersRM pair JSONL of validation pairs, e.g. "
                             "--trainer_plugin_config '{\"pairs\": \"val.jsonl\", \"eval_steps\": 10}'")
        self.pairs = os.path.abspath(self.pairs)
        if not os.path.isfile(self.pairs):
            raise ValueError(f"persrm_eval: pairs={self.pairs!r} is not a file; give a PersRM pair JSONL")
        for key in ("eval_steps", "max_new_tokens", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"persrm_eval: {key}={getattr(self, key)}; must be 1 or more")
        if self.limit < 0:
            raise ValueError(f"persrm_eval: limit={self.limit}; use 0 (all pairs) or a positive number")
        self.best_metric = self.best_metric or None

    def records(self) -> list[Any]:
        if self._records is None:
            from ..pairs import load_pairs

            records, _ = load_pairs(self.pairs)
            self._records = records[: self.limit] if self.limit else records
            if not self._records:
                raise ValueError(f"persrm_eval: {self.pairs} holds no pairs")
        return self._records

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_records"] = None
        return state

    def on_evaluate(self, *, stage: str, global_step: int, generate: GenerateFn) -> dict[str, float]:
        from ..judge_format import arrange, build_messages, parse_judgment

        records = self.records()
        plan = [(rec, pos) for rec in records for pos in ("A", "B")]
        prompts = [build_messages(rec.exemplars, rec.prompt, *arrange(rec.chosen, rec.rejected, pos))
                   for rec, pos in plan]
        outputs = generate(prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return score_outputs(plan, [parse_judgment(o, require_reasoning=self.require_reasoning) for o in outputs])


def score_outputs(plan: list[tuple[Any, str]], parsed: list[Any]) -> dict[str, float]:
    """Metrics (``eval_persrm_*``) of parsed judgments of ``(pair record, real_at)`` in ``plan``."""
    from ..eval.metrics import Judged, compute_metrics
    from ..judge_format import Judgment

    judged = []
    for (rec, pos), res in zip(plan, parsed):
        ok = isinstance(res, Judgment)
        judged.append(Judged(rec.id, rec.author, rec.negative_type, pos,
                             (res.score_a, res.score_b) if ok else None,
                             None if ok else getattr(getattr(res, "kind", None), "value", "unreadable")))
    m = compute_metrics(judged, n_resamples=20)
    overall = m["overall"]
    cons = m["consistency"]
    return {PREFIX + "accuracy": float(overall["accuracy"]),
            PREFIX + "position_consistency": float(cons["rate"]) if cons else 0.0,
            PREFIX + "format_failure_rate": float(overall["format_failure_rate"]),
            PREFIX + "tie_rate": float(overall["tie_rate"])}
