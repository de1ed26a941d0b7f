"""The settings of ``persrm eval``, one dataclass; each field is a flag of the same name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

JUDGES = ("random", "length", "stylometry", "artefact", "evidence", "fluency", "likelihood", "reader", "oracle",
          "model")
#: Judges that read a language model's likelihoods (they need --model, never --endpoint).
LIKELIHOOD_JUDGES = ("fluency", "likelihood")
#: Judges that read measured evidence only: the rows' own, or measured with --scorer.
READER_JUDGES = ("reader", "oracle")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    """What to evaluate, with which judge, and where the results go."""

    pairs: str = _f("", "pair JSONL to evaluate (the PersRM pair format)")
    judge: str = _f("", "random | length | stylometry | artefact | evidence | fluency | likelihood | reader | "
                        "oracle | model")
    out: str = _f("", "folder for metrics.json, metrics.md, judgments.jsonl and accuracy_by_type.png")
    model: str = _f("", "--judge model: a checkpoint folder or smollm2-135m-instruct; with --endpoint, "
                        "the served model name (default: the first the endpoint lists)")
    endpoint: str = _f("", "--judge model: an OpenAI-compatible server, e.g. http://localhost:8000/v1 "
                           "(judged through openrlhf_persrm.judges' openai backend)")
    api_key_env: str = _f("PERSRM_JUDGE_API_KEY", "environment variable holding the endpoint's API key (if any)")
    both_orders: bool = _f(False, "judge every pair twice, real text at A and at B (gives position consistency)")
    split: str = _f("", "keep only rows whose 'split' field equals this (e.g. test_unseen_authors)")
    limit: int = _f(0, "evaluate at most this many pairs, after --split, taken in turn from each author "
                           "(seeded; 0: all)")
    skip_invalid: bool = _f(False, "skip (and report) malformed rows instead of stopping at the first")
    seed: int = _f(0, "seed of the balanced A/B positions, the random judge and the bootstrap")
    bootstrap: int = _f(1000, "bootstrap resamples for the 95% confidence intervals")
    ngram: int = _f(3, "--judge stylometry: character n-gram size")
    weighting: str = _f("tfidf", "--judge stylometry: tf | tfidf")
    max_prompt_tokens: int = _f(1536, "--judge model (local): token budget of a judge prompt; exemplars "
                                      "are dropped or trimmed to fit")
    max_new_tokens: int = _f(512, "--judge model: tokens the judge may write")
    batch_size: int = _f(8, "--judge model (local): prompts generated together")
    dtype: str = _f("float32", "--judge model (local): float32, bfloat16, or auto (bfloat16 where the CPU has it "
                               "natively)")
    limit_per_type: int = _f(0, "evaluate at most this many pairs of each negative type, after --split, taken in "
                                "turn from each author (seeded; 0: no cap)")
    concurrency: int = _f(8, "--judge model (endpoint): requests in flight")
    fit_split: str = _f("train", "--judge artefact: the split of --pairs (all of its rows, whatever --split and "
                                 "--limit say) the artefact classifier is fitted on")
    label: str = _f("", "name of this judge in tables and comparison plots (default: derived from the judge)")
    evidence: str = _f("auto", "--judge model: show the judge the evidence on both candidates: auto (when the "
                               "checkpoint's persrm_judge.json says it was trained with evidence), on, off")
    scorer: str = _f("", "the frozen model that measures evidence the rows do not carry (--judge model with "
                         "evidence, reader, oracle); default: the scorer recorded with the judge, else the rows' "
                         "own evidence")

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("--pairs is required: the pair JSONL file to evaluate")
        if self.judge not in JUDGES:
            raise ValueError(f"--judge {self.judge!r}: unknown judge; choose one of {', '.join(JUDGES)}")
        if not self.out:
            raise ValueError("--out is required: the folder for metrics.json, metrics.md and the plot")
        if self.judge == "model" and not (self.model or self.endpoint):
            raise ValueError("--judge model needs --model PATH (a checkpoint folder or smollm2-135m-instruct) "
                             "or --endpoint URL (an OpenAI-compatible API root, e.g. http://localhost:8000/v1)")
        if self.judge in LIKELIHOOD_JUDGES:
            if not self.model or self.endpoint:
                raise ValueError(f"--judge {self.judge} reads a local model's likelihoods: pass --model PATH (a "
                                 "checkpoint folder or smollm2-135m-instruct) and no --endpoint")
        elif self.judge != "model":
            if self.scorer and self.judge not in READER_JUDGES:
                raise ValueError(f"--scorer is used by --judge model, reader and oracle, not --judge {self.judge}")
            for flag, value in (("--model", self.model), ("--endpoint", self.endpoint)):
                if value:
                    raise ValueError(f"{flag} {value!r} is only used by --judge model, not --judge {self.judge}; "
                                     f"drop {flag} or use --judge model")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint {self.endpoint!r}: expected an http(s) URL such as "
                             "http://localhost:8000/v1")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or auto")
        if self.limit_per_type < 0:
            raise ValueError(f"--limit_per_type {self.limit_per_type}: must be 0 (no cap) or positive")
        if self.limit < 0:
            raise ValueError(f"--limit {self.limit}: must be 0 (all pairs) or positive")
        if self.bootstrap < 100:
            raise ValueError(f"--bootstrap {self.bootstrap}: too few resamples for a 95% interval; use >= 100 "
                             "(1000 is the default)")
        if not 1 <= self.ngram <= 10:
            raise ValueError(f"--ngram {self.ngram}: use a character n-gram size from 1 to 10 (3 is classic)")
        if self.evidence not in ("auto", "on", "off"):
            raise ValueError(f"--evidence {self.evidence!r}: choose auto, on or off")
        if self.weighting not in ("tf", "tfidf"):
            raise ValueError(f"--weighting {self.weighting!r}: choose tf or tfidf")
        if self.max_prompt_tokens < 256:
            raise ValueError(f"--max_prompt_tokens {self.max_prompt_tokens}: too small for a judge prompt; "
                             "use >= 256")
        for flag, value in (("--max_new_tokens", self.max_new_tokens), ("--batch_size", self.batch_size),
                            ("--concurrency", self.concurrency)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be at least 1")

    @property
    def display_label(self) -> str:
        """The judge's name in tables: ``--label``, else e.g. ``stylometry`` or ``model:ckpt``."""
        if self.label:
            return self.label
        if self.judge != "model":
            return self.judge
        name = self.model or self.endpoint
        return "model:" + (os.path.basename(os.path.normpath(name)) if self.model else name)
