"""``persrm_policy``: prompts for a personalised policy, labelled for the ``persrm`` generative reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..contracts import DatasetFlags
from ..judge_format import defang
from ..pairs import load_pairs, write_jsonl
from ._common import MIN_KEPT_SHARE, ConversionReport, check_share, generation_reserve, openrlhf_counter

POLICY_SYSTEM = ("You write as the person whose writing samples you are shown. Continue their text in their "
                 "own voice: their tone, vocabulary, sentence rhythm and punctuation. Write only the continuation.")


@dataclass
class PersRMPolicyDataset:
    """Pair records -> ``{"prompt": messages, "label": {"exemplars", "reference", "prompt"}}``.

    The policy sees the person's exemplars (up to ``max_exemplars``) and the opening of their
    text; the label carries what the ``persrm`` reward needs to judge a sample against the
    person's real continuation (``reference`` = the pair's ``chosen``). The pair's negative
    is not used.

    With a tokenizer and ``--data.max_len``, exemplars are dropped (from the last) until the
    prompt fits what OpenRLHF leaves uncut: ``--data.max_len`` minus ``--rollout.max_new_tokens``
    (or ``max_new_tokens`` while that flag is unset), counted as OpenRLHF counts; the label
    keeps the exemplars the policy was shown. Rows that cannot fit even with one exemplar are
    skipped and warned about; below ``min_kept_share`` kept the conversion stops the run.
    """

    name = "persrm_policy"
    stage = "rl"
    flags = DatasetFlags(input_key="prompt", label_key="label", apply_chat_template=True)

    max_exemplars: int = 2
    skip_invalid: bool = False
    max_new_tokens: int | None = None
    min_kept_share: float = MIN_KEPT_SHARE

    def __post_init__(self) -> None:
        check_share(self.name, self.min_kept_share)
        if self.max_exemplars < 1:
            raise ValueError(f"persrm_policy: max_exemplars={self.max_exemplars} must be at least 1")

    @staticmethod
    def messages(exemplars: list[str], prompt: str) -> list[dict[str, str]]:
        samples = "\n\n".join(f"Sample {i}:\n{defang(ex)}" for i, ex in enumerate(exemplars, 1))
        user = f"{samples}\n\nContinue this text:\n{defang(prompt)}"
        return [{"role": "system", "content": POLICY_SYSTEM}, {"role": "user", "content": user}]

    def rows(self, src: str, report: ConversionReport, tokenizer: Any = None, max_len: int | None = None,
             max_new_tokens: int | None = None) -> Iterator[dict[str, Any]]:
        count, budget = None, None
        if tokenizer is not None and max_len is not None:
            from ..compat import max_prompt_tokens

            reserve = generation_reserve(self.name, max_new_tokens, self.max_new_tokens)
            budget = report.budget = max_prompt_tokens(max_len, reserve)
            count = openrlhf_counter(tokenizer)
            report.fixes["prompt_too_long"] = (
                f"prompts get --data.max_len ({max_len}) minus max_new_tokens ({reserve}) = {budget} tokens, too "
                "few for even one exemplar; raise --data.max_len or lower --rollout.max_new_tokens")
        if self.skip_invalid:
            report.fixes["invalid_pair"] = "repair the pairs file (its bad lines are listed with skip_invalid off)"
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
            exemplars = list(rec.exemplars[: self.max_exemplars])
            messages = self.messages(exemplars, rec.prompt)
            while count is not None and count(messages) > budget:
                if len(exemplars) <= 1:
                    messages = None
                    break
                exemplars.pop()
                report.exemplars_dropped += 1
                messages = self.messages(exemplars, rec.prompt)
            if messages is None:
                report.skipped["prompt_too_long"] += 1
                continue
            yield {"prompt": messages,
                   "label": {"exemplars": exemplars, "reference": rec.chosen, "prompt": rec.prompt,
                             "author": rec.author, "pair_id": rec.id},
                   "datasource": "persrm_policy"}

    def convert(self, src: str, dst: str, *, tokenizer: Any = None, max_len: int | None = None,
                max_new_tokens: int | None = None) -> int:
        """Write rows; ``max_new_tokens`` is ``--rollout.max_new_tokens`` (the wrapper passes it)."""
        report = ConversionReport(self.name, src)
        report.rows_written = write_jsonl(dst, self.rows(src, report, tokenizer, max_len, max_new_tokens))
        return report.finish(dst, self.min_kept_share)
