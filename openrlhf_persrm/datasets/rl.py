"""``persrm_rl``: stage-2 prompts with verifiable labels for OpenRLHF's PromptDataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..contracts import DatasetFlags
from ..judge_format import arrange, assign_positions
from ..pairs import load_pairs, write_jsonl
from ._common import ConversionReport, PromptFitter

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
        max_new_tokens: tokens kept free for the judgment when fitting prompts into
            ``--data.max_len`` (exemplars are dropped or trimmed to make room).
    """

    name = "persrm_rl"
    stage = "rl"
    flags = DatasetFlags(input_key="prompt", label_key="label", apply_chat_template=True)

    orders: str = "both"
    seed: int = 0
    max_new_tokens: int = 512
    skip_invalid: bool = False
    min_exemplar_words: int = 16

    def __post_init__(self) -> None:
        if self.orders not in ORDERS:
            raise ValueError(f"persrm_rl: orders={self.orders!r} is not one of {ORDERS}; "
                             "set it in --dataset_plugin_config, e.g. '{\"orders\": \"both\"}'")

    def rows(self, src: str, report: ConversionReport, tokenizer: Any = None,
             max_len: int | None = None) -> Iterator[dict[str, Any]]:
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
        budget = None if max_len is None else max_len - self.max_new_tokens
        fitter = PromptFitter(tokenizer, self.min_exemplar_words)
        for rec, pos in plan:
            a, b = arrange(rec.chosen, rec.rejected, pos)
            messages = fitter.fit(budget, rec.exemplars, rec.prompt, a, b, report)
            if messages is None:
                continue
            yield {"prompt": messages,
                   "label": {"chosen_position": pos, "pair_id": rec.id, "author": rec.author,
                             "negative_type": rec.negative_type},
                   "datasource": "persrm"}

    def convert(self, src: str, dst: str, *, tokenizer: Any = None, max_len: int | None = None) -> int:
        report = ConversionReport(self.name, src)
        report.rows_written = write_jsonl(dst, self.rows(src, report, tokenizer, max_len))
        report.save(dst)
        return report.rows_written
