"""``persrm_policy``: prompts for a personalised policy, labelled for the ``persrm`` generative reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..contracts import DatasetFlags
from ..judge_format import defang
from ..pairs import load_pairs, write_jsonl
from ._common import ConversionReport

POLICY_SYSTEM = ("You write as the person whose writing samples you are shown. Continue their text in their "
                 "own voice: their tone, vocabulary, sentence rhythm and punctuation. Write only the continuation.")


@dataclass
class PersRMPolicyDataset:
    """Pair records -> ``{"prompt": messages, "label": {"exemplars", "reference", "prompt"}}``.

    The policy sees the person's exemplars (up to ``max_exemplars``) and the opening of their
    text; the label carries what the ``persrm`` reward needs to judge a sample against the
    person's real continuation (``reference`` = the pair's ``chosen``). The pair's negative
    is not used.
    """

    name = "persrm_policy"
    stage = "rl"
    flags = DatasetFlags(input_key="prompt", label_key="label", apply_chat_template=True)

    max_exemplars: int = 2
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if self.max_exemplars < 1:
            raise ValueError(f"persrm_policy: max_exemplars={self.max_exemplars} must be at least 1")

    def rows(self, src: str, report: ConversionReport) -> Iterator[dict[str, Any]]:
        records, read = load_pairs(src, skip_invalid=self.skip_invalid)
        if read.skipped:
            report.skipped["invalid_pair"] += read.skipped
        report.pairs_read = len(records)
        seen: set[tuple[str, str]] = set()
        for rec in records:
            key = (rec.author, rec.prompt)
            if key in seen:  # several negatives of one target make one policy prompt
                report.skipped["duplicate_prompt"] += 1
                continue
            seen.add(key)
            exemplars = rec.exemplars[: self.max_exemplars]
            samples = "\n\n".join(f"Sample {i}:\n{defang(ex)}" for i, ex in enumerate(exemplars, 1))
            user = f"{samples}\n\nContinue this text:\n{defang(rec.prompt)}"
            yield {"prompt": [{"role": "system", "content": POLICY_SYSTEM}, {"role": "user", "content": user}],
                   "label": {"exemplars": exemplars, "reference": rec.chosen, "prompt": rec.prompt,
                             "author": rec.author, "pair_id": rec.id},
                   "datasource": "persrm_policy"}

    def convert(self, src: str, dst: str, *, tokenizer: Any = None, max_len: int | None = None) -> int:
        report = ConversionReport(self.name, src)
        report.rows_written = write_jsonl(dst, self.rows(src, report))
        report.save(dst)
        return report.rows_written
