"""``persrm_sft``: stage-1 rows (judge prompt -> reasoning trace + answer) for OpenRLHF's SFTDataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ..contracts import DatasetFlags
from ..judge_format import arrange, format_target
from ..pairs import PairFormatError, read_pairs, write_jsonl
from ._common import (MIN_KEPT_SHARE, ConversionReport, PromptFitter, check_evidence_mode, check_share,
                      pair_evidence)


@dataclass
class PersRMSFTDataset:
    """Pair records carrying a reasoning ``trace`` -> ``{"prompt": messages, "response": [assistant]}``.

    OpenRLHF's ``SFTDataset`` applies the chat template to ``prompt`` and to
    ``prompt + response`` and puts the loss on the response only, so the model learns to
    write the analysis and the answer, never the prompt. The A/B order is the one the
    trace was written for (``trace.chosen_position``).

    With a tokenizer and ``max_len``, exemplars are dropped or trimmed so that prompt and
    target fit in ``max_len`` tokens (OpenRLHF would otherwise drop long rows silently);
    rows that cannot fit are skipped, counted in ``<dst>.report.json`` and warned about; below
    ``min_kept_share`` of the rows kept (default half) the conversion stops the run, naming
    the cause and the flag that fixes it.
    """

    name = "persrm_sft"
    stage = "sft"
    flags = DatasetFlags(input_key="prompt", output_key="response", apply_chat_template=True)

    skip_invalid: bool = False
    min_exemplar_words: int = 16
    min_kept_share: float = MIN_KEPT_SHARE
    evidence: str = "auto"

    def __post_init__(self) -> None:
        check_share(self.name, self.min_kept_share)
        check_evidence_mode(self.name, self.evidence)

    def rows(self, src: str, report: ConversionReport, tokenizer: Any = None,
             max_len: int | None = None) -> Iterator[dict[str, Any]]:
        fitter = PromptFitter(tokenizer, self.min_exemplar_words)
        report.fixes.update(
            prompt_too_long=f"a row's prompt and reasoning trace must fit in --data.max_len ({max_len}) tokens "
                            "together; raise --data.max_len, or make shorter traces (persrm synth --traces.style "
                            "brief) or fewer exemplars (persrm synth --pairs.max_exemplars)",
            no_trace="these pairs have no reasoning trace; make SFT data with `persrm synth` (its sft.jsonl)",
            invalid_pair="repair the pairs file (its bad lines are listed with skip_invalid off)")
        for rec in read_pairs(src, skip_invalid=self.skip_invalid):
            report.pairs_read += 1
            trace = rec.trace
            if trace is None:
                if self.skip_invalid:
                    report.skipped["no_trace"] += 1
                    continue
                raise PairFormatError(f"pair {rec.id!r}: persrm_sft needs a reasoning 'trace' "
                                      "(make one with `persrm synth`)", path=src, field="trace")
            target = format_target(trace.reasoning, *trace.scores)
            budget = None
            if tokenizer is not None and max_len is not None:
                # Leave room for the target and the end-of-turn tokens the template adds.
                budget = max_len - len(tokenizer(target, add_special_tokens=False)["input_ids"]) - 8
            a, b = arrange(rec.chosen, rec.rejected, trace.chosen_position)
            evidence = pair_evidence(rec, self.evidence, self.name, src)
            if evidence is not None:
                evidence = evidence.arranged(trace.chosen_position)
            messages = fitter.fit(budget, rec.exemplars, rec.prompt, a, b, report, evidence)
            if messages is None:
                continue
            yield {"prompt": messages, "response": [{"role": "assistant", "content": target}],
                   "pair_id": rec.id, "author": rec.author, "negative_type": rec.negative_type}

    def convert(self, src: str, dst: str, *, tokenizer: Any = None, max_len: int | None = None) -> int:
        report = ConversionReport(self.name, src)
        report.rows_written = write_jsonl(dst, self.rows(src, report, tokenizer, max_len))
        return report.finish(dst, self.min_kept_share)
