"""What both dataset plugins share: fitting judge prompts into a token budget, and a
conversion report that says what was left out and why."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..judge_format import BudgetedPrompt, ExemplarBudget, PromptTooLong, build_messages, chat_token_counter

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """Counts for one conversion, written beside the output as ``<dst>.report.json``."""

    plugin: str
    src: str
    rows_written: int = 0
    pairs_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    exemplars_dropped: int = 0
    exemplars_trimmed: int = 0

    def save(self, dst: str) -> None:
        data = {"plugin": self.plugin, "src": os.path.abspath(self.src), "pairs_read": self.pairs_read,
                "rows_written": self.rows_written, "skipped": dict(self.skipped),
                "exemplars_dropped": self.exemplars_dropped, "exemplars_trimmed": self.exemplars_trimmed}
        with open(dst + ".report.json", "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        if self.skipped:
            logger.warning("%s: %s -> %d rows; skipped %s (see %s.report.json)", self.plugin, self.src,
                           self.rows_written, dict(self.skipped), dst)
        else:
            logger.info("%s: %s -> %d rows", self.plugin, self.src, self.rows_written)


class PromptFitter:
    """Builds judge messages, fitted to a token budget when a tokenizer is given."""

    def __init__(self, tokenizer: Any = None, min_exemplar_words: int = 16):
        self._count = chat_token_counter(tokenizer) if tokenizer is not None else None
        self.min_exemplar_words = min_exemplar_words

    def fit(self, budget: int | None, exemplars: Sequence[str], prompt: str, a: str, b: str,
            report: ConversionReport) -> list[dict[str, str]] | None:
        """Messages within ``budget`` tokens, or None (counted as skipped) if they cannot fit."""
        if self._count is None or budget is None:
            return build_messages(exemplars, prompt, a, b)
        try:
            fitted: BudgetedPrompt = ExemplarBudget(budget, self.min_exemplar_words).fit(
                self._count, exemplars, prompt, a, b)
        except PromptTooLong:
            report.skipped["prompt_too_long"] += 1
            return None
        report.exemplars_dropped += fitted.exemplars_dropped
        report.exemplars_trimmed += int(fitted.trimmed)
        return fitted.messages
