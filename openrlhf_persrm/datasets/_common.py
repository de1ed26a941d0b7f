"""What the dataset plugins share: fitting prompts into a token budget, and a conversion report
that says what was left out and why, and stops a run that would train on too little."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..evidence.measures import PairEvidence
from ..judge_format import BudgetedPrompt, ExemplarBudget, PromptTooLong, build_messages, chat_token_counter

logger = logging.getLogger(__name__)

#: Skip reasons that are not losses (several negatives of one target make one policy prompt).
NOT_DROPPED = frozenset({"duplicate_prompt"})

#: Default of every plugin's ``min_kept_share``.
MIN_KEPT_SHARE = 0.5


class TooFewRows(ValueError):
    """A conversion kept less than ``min_kept_share`` of its rows; names the cause and the fix."""


def check_share(plugin: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{plugin}: min_kept_share={value} must be in [0, 1]; set it in --dataset_plugin_config, "
                         "e.g. '{\"min_kept_share\": 0.5}' (0 turns the check off)")


@dataclass
class ConversionReport:
    """Counts for one conversion, written beside the output as ``<dst>.report.json``.

    ``fixes`` maps a skip reason to what the user can change to keep those rows.
    """

    plugin: str
    src: str
    rows_written: int = 0
    pairs_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    exemplars_dropped: int = 0
    exemplars_trimmed: int = 0
    fixes: dict[str, str] = field(default_factory=dict)
    budget: int | None = None

    @property
    def dropped(self) -> int:
        return sum(n for reason, n in self.skipped.items() if reason not in NOT_DROPPED)

    @property
    def kept_share(self) -> float:
        planned = self.rows_written + self.dropped
        return self.rows_written / planned if planned else 1.0

    def cause(self) -> str:
        """The drops, by reason, each with its fix."""
        parts = []
        for reason, n in self.skipped.most_common():
            if reason in NOT_DROPPED:
                continue
            fix = self.fixes.get(reason)
            parts.append(f"{n} {reason}" + (f" (fix: {fix})" if fix else ""))
        return "; ".join(parts)

    def save(self, dst: str) -> None:
        data = {"plugin": self.plugin, "src": os.path.abspath(self.src), "pairs_read": self.pairs_read,
                "rows_written": self.rows_written, "skipped": dict(self.skipped),
                "kept_share": round(self.kept_share, 4), "prompt_budget_tokens": self.budget,
                "exemplars_dropped": self.exemplars_dropped, "exemplars_trimmed": self.exemplars_trimmed}
        with open(dst + ".report.json", "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        if self.dropped:
            logger.warning("!! %s: %s -> %d rows; DROPPED %d of %d (%.0f%% kept): %s. Details: %s.report.json",
                           self.plugin, self.src, self.rows_written, self.dropped, self.rows_written + self.dropped,
                           100 * self.kept_share, self.cause(), dst)
        elif self.skipped:
            logger.info("%s: %s -> %d rows; %s", self.plugin, self.src, self.rows_written, dict(self.skipped))
        else:
            logger.info("%s: %s -> %d rows", self.plugin, self.src, self.rows_written)

    def finish(self, dst: str, min_kept_share: float) -> int:
        """Save the report; below ``min_kept_share`` remove ``dst`` (so no cache reuses it) and raise."""
        self.save(dst)
        if self.dropped and (self.kept_share < min_kept_share or not self.rows_written):
            try:
                os.unlink(dst)
            except FileNotFoundError:
                pass
            raise TooFewRows(
                f"{self.plugin}: {self.src} kept only {self.rows_written} of {self.rows_written + self.dropped} rows "
                f"({100 * self.kept_share:.0f}% < min_kept_share {min_kept_share:.0%}): {self.cause()}. "
                f"Training on them would learn little; fix the cause, or lower min_kept_share in "
                f"--dataset_plugin_config (e.g. '{{\"min_kept_share\": 0.1}}'). Details: {dst}.report.json")
        return self.rows_written


EVIDENCE_MODES = ("auto", "on", "off")


def check_evidence_mode(plugin: str, mode: str) -> None:
    if mode not in EVIDENCE_MODES:
        raise ValueError(f"{plugin}: evidence={mode!r} is not one of {EVIDENCE_MODES}; set it in "
                         "--dataset_plugin_config, e.g. '{\"evidence\": \"on\"}'")


def pair_evidence(rec: Any, mode: str, plugin: str, src: str) -> PairEvidence | None:
    """The evidence a row's judge prompt shows (``first`` = the real text): the row's own under ``auto``
    (when it has one) and ``on`` (required), none under ``off`` (plain PersRM-R1 judging)."""
    if mode == "off":
        return None
    try:
        evidence = rec.evidence
    except ValueError as exc:
        from ..pairs import PairFormatError

        raise PairFormatError(f"pair {rec.id!r}: {exc}", path=src, field="evidence") from None
    if evidence is None and mode == "on":
        from ..pairs import PairFormatError

        raise PairFormatError(f"pair {rec.id!r} has no 'evidence', but {plugin} was asked for evidence "
                              "(evidence: on); measure it with `persrm synth --evidence.scorer MODEL`",
                              path=src, field="evidence")
    return evidence


def openrlhf_counter(tokenizer: Any) -> Callable[[list[dict[str, str]]], int]:
    """Prompt tokens exactly as OpenRLHF's rollouts count them (see :mod:`openrlhf_persrm.compat`)."""
    from .. import compat

    return compat.prompt_token_counter(tokenizer)


class PromptFitter:
    """Builds judge messages, fitted to a token budget when a tokenizer is given."""

    def __init__(self, tokenizer: Any = None, min_exemplar_words: int = 16,
                 counter: Callable[[list[dict[str, str]]], int] | None = None):
        if counter is None and tokenizer is not None:
            counter = chat_token_counter(tokenizer)
        self._count = counter
        self.min_exemplar_words = min_exemplar_words

    def fit(self, budget: int | None, exemplars: Sequence[str], prompt: str, a: str, b: str,
            report: ConversionReport, evidence: PairEvidence | None = None) -> list[dict[str, str]] | None:
        """Messages within ``budget`` tokens, or None (counted as skipped) if they cannot fit;
        ``evidence`` on A and B (in that order) for an evidence-informed judge."""
        if self._count is None or budget is None:
            return build_messages(exemplars, prompt, a, b, evidence=evidence)
        try:
            fitted: BudgetedPrompt = ExemplarBudget(budget, self.min_exemplar_words).fit(
                self._count, exemplars, prompt, a, b, evidence)
        except PromptTooLong:
            report.skipped["prompt_too_long"] += 1
            return None
        report.exemplars_dropped += fitted.exemplars_dropped
        report.exemplars_trimmed += int(fitted.trimmed)
        return fitted.messages


#: Tokens kept free for generation while ``--rollout.max_new_tokens`` is unset.
DEFAULT_GENERATION_RESERVE = 512


def generation_reserve(plugin: str, rollout_max_new_tokens: int | None, own: int | None) -> int:
    """Tokens OpenRLHF keeps free for generation: ``--rollout.max_new_tokens`` when given (it is what
    OpenRLHF truncates by), else the plugin's own ``max_new_tokens`` (default 512)."""
    if rollout_max_new_tokens:
        if own and own != rollout_max_new_tokens:
            logger.warning("%s: budgeting prompts with --rollout.max_new_tokens %d, not the plugin's max_new_tokens "
                           "%d (OpenRLHF truncates by the former)", plugin, rollout_max_new_tokens, own)
        return int(rollout_max_new_tokens)
    return int(own or DEFAULT_GENERATION_RESERVE)
