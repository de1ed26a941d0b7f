"""``persrm_rl``: stage-2 prompts with verifiable labels for OpenRLHF's PromptDataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..contracts import DatasetFlags
from ..judge_format import arrange, assign_positions
from ..pairs import load_pairs, write_jsonl
from ._common import (MIN_KEPT_SHARE, ConversionReport, PromptFitter, check_evidence_mode, check_share,
                      generation_reserve, openrlhf_counter, pair_evidence)

ORDERS = ("both", "balanced", "A", "B")


@dataclass
class PersRMRLDataset:
    """Pair records -> ``{"prompt": messages, "label": {"chosen_position": ..., ...}}``.

    Args:
        orders: ``"both"`` writes each pair twice, real text at A and at B (removes
            position bias from the training signal); ``"balanced"`` writes each pair once
            with positions from :func:`assign_positions` (exactly balanced, seeded);
            ``"A"``/``"B"`` put the real text always there (for probing position bias).
        seed: seed for ``"balanced"``.
        max_new_tokens: tokens kept free for the judgment when ``--rollout.max_new_tokens`` is
            not given (default 512). Prompts are fitted (exemplars dropped or trimmed) into exactly what
            OpenRLHF leaves uncut: ``--data.max_len`` minus ``--rollout.max_new_tokens``
            (or this value), counted as OpenRLHF counts them.
        min_kept_share: stop the run when fewer than this share of the rows fit (0: never).
    """

    name = "persrm_rl"
    stage = "rl"
    flags = DatasetFlags(input_key="prompt", label_key="label", apply_chat_template=True)

    orders: str = "both"
    seed: int = 0
    max_new_tokens: int | None = None
    skip_invalid: bool = False
    min_exemplar_words: int = 16
    min_kept_share: float = MIN_KEPT_SHARE
    evidence: str = "auto"

    def __post_init__(self) -> None:
        check_share(self.name, self.min_kept_share)
        check_evidence_mode(self.name, self.evidence)
        if self.orders not in ORDERS:
            raise ValueError(f"persrm_rl: orders={self.orders!r} is not one of {ORDERS}; "
                             "set it in --dataset_plugin_config, e.g. '{\"orders\": \"both\"}'")

    def rows(self, src: str, report: ConversionReport, tokenizer: Any = None,
             max_len: int | None = None, max_new_tokens: int | None = None) -> Iterator[dict[str, Any]]:
        records, read = load_pairs(src, skip_invalid=self.skip_invalid)
        if read.skipped:
            report.skipped["invalid_pair"] += read.skipped
        report.pairs_read = len(records)
        if self.orders == "both":
            plan = [(rec, pos) for rec in records for pos in ("A", "B")]
        elif self.orders == "balanced":
            plan = list(zip(records, assign_positions([r.id for r in records], self.seed)))
        else:
            plan = [(rec, self.orders) for rec in records]
        budget, fitter = None, PromptFitter(None, self.min_exemplar_words)
        if tokenizer is not None and max_len is not None:
            from ..compat import max_prompt_tokens

            reserve = generation_reserve(self.name, max_new_tokens, self.max_new_tokens)
            budget = report.budget = max_prompt_tokens(max_len, reserve)
            fitter = PromptFitter(tokenizer, self.min_exemplar_words, counter=openrlhf_counter(tokenizer))
            how = (f"--rollout.max_new_tokens ({reserve})" if max_new_tokens else
                   f"this plugin's max_new_tokens ({reserve}, in --dataset_plugin_config; used while "
                   "--rollout.max_new_tokens is unset)")
            report.fixes["prompt_too_long"] = (
                f"prompts get --data.max_len ({max_len}) minus {how} = {budget} tokens; raise --data.max_len, "
                "or lower that max_new_tokens, or give fewer exemplars (persrm synth --pairs.max_exemplars)")
        if self.skip_invalid:
            report.fixes["invalid_pair"] = "repair the pairs file (its bad lines are listed with skip_invalid off)"
        for rec, pos in plan:
            a, b = arrange(rec.chosen, rec.rejected, pos)
            evidence = pair_evidence(rec, self.evidence, self.name, src)
            if evidence is not None:
                evidence = evidence.arranged(pos)
            messages = fitter.fit(budget, rec.exemplars, rec.prompt, a, b, report, evidence)
            if messages is None:
                continue
            yield {"prompt": messages,
                   "label": {"chosen_position": pos, "pair_id": rec.id, "author": rec.author,
                             "negative_type": rec.negative_type},
                   "datasource": "persrm"}

    def convert(self, src: str, dst: str, *, tokenizer: Any = None, max_len: int | None = None,
                max_new_tokens: int | None = None) -> int:
        """Write rows; ``max_new_tokens`` is ``--rollout.max_new_tokens`` (the wrapper passes it)."""
        report = ConversionReport(self.name, src)
        report.rows_written = write_jsonl(dst, self.rows(src, report, tokenizer, max_len, max_new_tokens))
        return report.finish(dst, self.min_kept_share)
