"""The synthesis pipeline: plan -> generate (resumably) -> assemble -> write outputs + manifest.

1. **Plan** (pure, seeded): read the corpus, pick the subset, split by author, and turn each
   target paragraph into one :class:`PairTask` per negative type it is assigned: prompt,
   real continuation, exemplars (same author, same split, never the target or its
   neighbours, other works first).
2. **Generate**: each task makes its negative (checked, retried, or rejected) and, for the
   trace splits, its teacher reasoning traces (rejection sampling). Every finished task is
   appended as one JSON line to ``<output_dir>/.work/results.jsonl``; a rerun of the same
   command skips finished tasks; a torn last line (the process was killed while writing
   it) or a corrupt line anywhere is reported and dropped, and only its task is recomputed
   (:class:`WorkLog`); temporary files of a write killed midway are removed. Teacher
   replies are cached by request, and every random choice is seeded by the task id, so
   results do not depend on timing, order or interruptions.
3. **Assemble** (pure): results in plan order, duplicates removed, A/B positions balanced,
   files written atomically, ``manifest.json`` last.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from openrlhf_persrm.judge_format import Judgment, assign_positions, arrange, build_messages, parse_judgment
from openrlhf_persrm.eval.judges import shortcut_report
from openrlhf_persrm.pairs import PairRecord, Trace, remove_stale_tmp, write_pairs

from .config import SPLITS, SynthConfig
from .corpus import Corpus, Paragraph, load_corpus
from .negatives import (NEUTRAL_PROMPT, RANDOM_STYLES, TEACHER_TYPES, CrossAuthorPool, Continuation,
                        NegativeBounds, check_negative, clean_continuation, cross_author, mimic_messages,
                        minor_replacement, random_style_messages)
from .splits import SplitPlan, exemplar_candidates, seeded_key, split_corpus
from .stylometry import evidence_trace
from .text import count_words, normalize_typography, split_prompt

logger = logging.getLogger(__name__)

FORMAT = "persrm-synth/1"
WORK_DIR = ".work"
OUTPUT_FILES = ("pairs.jsonl", "sft.jsonl", "sft_validation.jsonl", "rl.jsonl", "rl_validation.jsonl",
                "manifest.json")
WORK_FILES = ("signature.json", "results.jsonl")  # the files in .work/ written through a temp file
# Flags that change how fast a run goes, never what it writes: a resume may change them.
_TRANSPORT_FIELDS = {"teacher": ("base_url", "api_key_env", "concurrency", "timeout", "retries", "backoff",
                                 "cache", "threads"),
                     "evidence": ("batch_size", "endpoint")}


class IncompleteRun(RuntimeError):
    """Some tasks could not reach the teacher; rerunning the same command finishes them."""


def demo_corpus_path() -> str:
    import openrlhf_persrm

    return os.path.join(os.path.dirname(openrlhf_persrm.__file__), "data", "demo_corpus.jsonl")


def code_version() -> dict[str, str]:
    """A content hash of the code that decides what is written (this package, the pair and judge formats)."""
    import openrlhf_persrm

    digest = hashlib.sha256()
    here = Path(__file__).parent
    files = sorted(here.glob("*.py")) + [Path(openrlhf_persrm.__file__).parent / n
                                         for n in ("pairs.py", "judge_format.py")]
    for path in files:
        digest.update(path.name.encode() + b"\x00" + path.read_bytes())
    return {"data_synth": digest.hexdigest()[:16], "openrlhf_persrm": openrlhf_persrm.__version__}


def content_config(cfg: SynthConfig) -> dict[str, Any]:
    """The configuration that decides the outputs (no paths of this run, no transport knobs)."""
    out = asdict(cfg)
    out.pop("output_dir")
    out.pop("progress")
    for section, names in _TRANSPORT_FIELDS.items():
        for name in names:
            out[section].pop(name, None)
    return out


# --------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class PairTask:
    id: str
    split: str
    author: str
    work: str
    idx: int
    prompt: str
    chosen: str
    exemplars: tuple[str, ...]
    exemplar_refs: tuple[str, ...]
    negative_type: str
    needs_trace: bool
    planned_position: str
    same_work_exemplars: bool = False


@dataclass
class Plan:
    paragraphs: list[Paragraph]
    splits: SplitPlan
    tasks: list[PairTask]
    pools: dict[str, CrossAuthorPool]
    skipped: Counter = field(default_factory=Counter)


def select_paragraphs(paragraphs: Sequence[Paragraph], cfg: SynthConfig) -> list[Paragraph]:
    """The subset of the corpus this run uses (seeded, whole runs of consecutive paragraphs)."""
    seed, c = cfg.seed, cfg.corpus
    by_author: dict[str, list[Paragraph]] = defaultdict(list)
    for p in paragraphs:
        by_author[p.author].append(p)
    authors = sorted(by_author)
    if c.authors:
        missing = [a for a in c.authors if a not in by_author]
        if missing:
            raise ValueError(f"--corpus.authors names {missing}, not in the corpus; known authors include "
                             f"{', '.join(authors[:10])}")
        authors = [a for a in authors if a in set(c.authors)]
    if c.max_authors is not None and len(authors) > c.max_authors:
        authors = sorted(sorted(authors, key=lambda a: seeded_key(seed, "author", a))[:c.max_authors])
    out: list[Paragraph] = []
    for a in authors:
        items = sorted(by_author[a], key=lambda p: (p.work, p.idx))
        if c.max_paragraphs_per_author is not None and len(items) > c.max_paragraphs_per_author:
            run = max(1, cfg.split.block_size)
            runs = [items[i:i + run] for i in range(0, len(items), run)]
            runs.sort(key=lambda r: seeded_key(seed, "run", r[0].uid))
            kept: list[Paragraph] = []
            for r in runs:
                if len(kept) >= c.max_paragraphs_per_author:
                    break
                kept.extend(r[: c.max_paragraphs_per_author - len(kept)])
            items = sorted(kept, key=lambda p: (p.work, p.idx))
        out.extend(items)
    return out


def _types_for(p: Paragraph, rank: int, continuation: str, types: list[str], cfg: SynthConfig,
               wordnet: Any) -> list[str]:
    """The negative types of one target: a seeded rotation; with ``--pairs.replacement_first``,
    ``minor_replacement`` first wherever the text has enough replaceable words, never where it has not."""
    k = cfg.pairs.types_per_paragraph
    if not (cfg.pairs.replacement_first and "minor_replacement" in types and wordnet is not None):
        return [types[(rank + j) % len(types)] for j in range(k)]
    others = [t for t in types if t != "minor_replacement"]
    rng = random.Random(seeded_key(cfg.seed, "negative", f"{p.uid}:minor_replacement", 0))
    feasible = minor_replacement(continuation, wordnet, rng, min_replaced=cfg.pairs.min_replaced,
                                 max_replaced=cfg.pairs.max_replaced) is not None
    head = ["minor_replacement"] if feasible else []
    return head + [others[(rank + j) % len(others)] for j in range(min(k - len(head), len(others)))]


def plan_tasks(paragraphs: Sequence[Paragraph], cfg: SynthConfig, wordnet: Any = None) -> Plan:
    """Every pair this run will try to make, in a deterministic order.

    Every text is put in one typography first (:func:`~data_synth.text.normalize_typography`),
    the same that teacher replies get, so typography never tells real from generated text.
    """
    seed, pc, sc = cfg.seed, cfg.pairs, cfg.split
    paragraphs = [replace(p, text=normalize_typography(p.text)) for p in paragraphs]
    splits = split_corpus(paragraphs, sc, seed)
    by_uid = {p.uid: p for p in paragraphs}
    too_long = {p.uid for p in paragraphs if pc.max_words is not None and count_words(p.text) > pc.max_words}
    cut: dict[str, tuple[str, str] | None] = {
        p.uid: split_prompt(p.text, min_prompt_words=pc.min_prompt_words,
                            max_prompt_sentences=pc.max_prompt_sentences,
                            min_continuation_words=pc.min_continuation_words) for p in paragraphs}
    neutral = pc.cross_author_prompt == "neutral"
    tasks: list[PairTask] = []
    pools: dict[str, CrossAuthorPool] = {}
    skipped: Counter = Counter()
    types = list(pc.negative_types)
    for split in SPLITS:
        members = [by_uid[u] for u in splits.members(split) if u not in too_long]
        # cross_author negatives: whole paragraphs with a neutral prompt, else continuations.
        pools[split] = CrossAuthorPool([
            Continuation(p.uid, p.author, p.text if neutral else cut[p.uid][1],
                         count_words(p.text if neutral else cut[p.uid][1]))
            for p in members if cut[p.uid] is not None and p.uid not in splits.exemplar_only])
        by_author: dict[str, list[Paragraph]] = defaultdict(list)
        for p in members:
            by_author[p.author].append(p)
        targets: list[Paragraph] = []
        for author in sorted(by_author):
            candidates = [p for p in by_author[author] if p.uid not in splits.exemplar_only]
            candidates.sort(key=lambda p: seeded_key(seed, "target", p.uid))
            usable = []
            for p in candidates:
                if cut[p.uid] is None:
                    skipped[f"{split}:unsplittable"] += 1
                    continue
                usable.append(p)
            cap = pc.targets_cap(split)
            if cap is not None:
                usable = usable[:cap]
            targets.extend(usable)
        targets.sort(key=lambda p: seeded_key(seed, "types", p.uid))
        fallback = sc.min_exemplar_distance if split in sc.same_work_fallback else None
        split_tasks: list[PairTask] = []
        for rank, p in enumerate(targets):
            rng = random.Random(seeded_key(seed, "exemplars", p.uid))
            options = exemplar_candidates(p, by_author[p.author], sc.neighbour_window, seed,
                                          source=sc.exemplar_source, same_work_distance=fallback)
            if len(options) < pc.min_exemplars:
                reason = "no_other_work" if sc.exemplar_source == "other_work" and not any(
                    q.work != p.work for q in by_author[p.author]) else "too_few_exemplars"
                skipped[f"{split}:{reason}"] += 1
                continue
            k = min(len(options), rng.randint(pc.min_exemplars, pc.max_exemplars))
            chosen_ex = options[:k]
            same_work = any(e.work == p.work for e in chosen_ex)
            prompt, continuation = cut[p.uid]
            for ntype in _types_for(p, rank, continuation, types, cfg, wordnet):
                if ntype == "cross_author" and neutral:
                    t_prompt, t_chosen = NEUTRAL_PROMPT, p.text
                else:
                    t_prompt, t_chosen = prompt, continuation
                split_tasks.append(PairTask(
                    id=f"{p.uid}:{ntype}", split=split, author=p.author, work=p.work, idx=p.idx,
                    prompt=t_prompt, chosen=t_chosen, exemplars=tuple(e.text for e in chosen_ex),
                    exemplar_refs=tuple(e.uid for e in chosen_ex), negative_type=ntype,
                    needs_trace=split in cfg.traces.splits, planned_position="",
                    same_work_exemplars=same_work))
        split_tasks.sort(key=lambda t: t.id)
        positions = assign_positions([t.id for t in split_tasks], seed)
        tasks.extend(replace(t, planned_position=pos) for t, pos in zip(split_tasks, positions))
    if too_long:
        skipped["longer_than_max_words"] = len(too_long)
    return Plan(list(paragraphs), splits, tasks, pools, skipped)


# --------------------------------------------------------------------------- generation

def _int_seed(*parts: object) -> int:
    return int(seeded_key(*parts)[:8], 16)


@dataclass
class Context:
    cfg: SynthConfig
    plan: Plan
    teacher: Any
    wordnet: Any = None

    @property
    def bounds(self) -> NegativeBounds:
        p = self.cfg.pairs
        return NegativeBounds(p.min_length_ratio, p.max_length_ratio, p.min_replaced, p.max_replaced)


async def make_negative(task: PairTask, ctx: Context) -> tuple[str | None, dict[str, Any], Counter]:
    """``(rejected text or None, provenance, failed-try reasons)`` for one task."""
    from .teachers import ChatRequest, truncated

    cfg, seed = ctx.cfg, ctx.cfg.seed
    reasons: Counter = Counter()
    n_words = count_words(task.chosen)
    tried: set[str] = set()
    for attempt in range(cfg.pairs.max_tries):
        rng = random.Random(seeded_key(seed, "negative", task.id, attempt))
        provenance: dict[str, Any] = {"tries": attempt + 1}
        if task.negative_type == "minor_replacement":
            made = minor_replacement(task.chosen, ctx.wordnet, rng, min_replaced=cfg.pairs.min_replaced,
                                     max_replaced=cfg.pairs.max_replaced)
            if made is None:
                reasons["too_few_replaceable"] += 1
                break  # more tries cannot find more replaceable words
            text, replaced = made
            provenance["replacements"] = [[r.original, r.replacement, r.pos] for r in replaced]
            provenance["source"] = "wordnet-3.0"
        elif task.negative_type == "cross_author":
            found = cross_author(task.author, n_words, ctx.plan.pools[task.split], rng, exclude=frozenset(tried))
            if found is None:
                reasons["no_cross_author_candidate"] += 1
                break
            tried.add(found.uid)
            text = found.text
            provenance.update({"source_uid": found.uid, "source_author": found.author})
        elif task.negative_type in TEACHER_TYPES:
            if task.negative_type == "style_mimic":
                messages = mimic_messages(task.exemplars, task.prompt, n_words)
            else:
                style = RANDOM_STYLES[rng.randrange(len(RANDOM_STYLES))]
                messages = random_style_messages(task.prompt, n_words, style)
                provenance["style"] = style
            request = ChatRequest.make(messages, max_tokens=cfg.teacher.max_tokens,
                                       temperature=cfg.teacher.temperature,
                                       seed=_int_seed(seed, "teacher_negative", task.id, attempt))
            raw = await ctx.teacher.chat(request)
            max_words = int(n_words * cfg.pairs.max_length_ratio)
            text = clean_continuation(raw, task.prompt, max_words=max_words)
            if truncated(raw) and not _cut_before_the_limit(raw, text, task.prompt):
                reasons["truncated"] += 1  # cut at --teacher.max_tokens: it would end mid-sentence
                continue
            provenance["source"] = "teacher:" + str(ctx.teacher.identity.get("model"))
        else:  # guarded by the config; kept for third-party types
            raise ValueError(f"unknown negative type {task.negative_type!r}")
        reason = check_negative(task.negative_type, task.chosen, text, exemplars=task.exemplars,
                                prompt=task.prompt, bounds=ctx.bounds)
        if reason is None:
            return text, provenance, reasons
        reasons[reason] += 1
    return None, {}, reasons


def _cut_before_the_limit(raw: str, text: str, prompt: str) -> bool:
    """A reply cut at ``--teacher.max_tokens`` is still usable when the continuation kept from it is whole
    sentences that end well before the cut (the length limit, not the token limit, ended it)."""
    from .negatives import ends_sentence

    return (bool(text) and ends_sentence(text)
            and count_words(text) < count_words(clean_continuation(raw, prompt)) - 5)


async def teacher_trace(task: PairTask, rejected: str, position: str, ctx: Context) -> tuple[dict | None, Counter]:
    """Rejection sampling: up to ``traces.tries`` judgments with the real text at ``position``."""
    from .teachers import ChatRequest, truncated

    outcomes: Counter = Counter()
    a, b = arrange(task.chosen, rejected, position)
    messages = build_messages(task.exemplars, task.prompt, a, b)
    for attempt in range(ctx.cfg.traces.tries):
        request = ChatRequest.make(messages, max_tokens=ctx.cfg.teacher.judge_max_tokens,
                                   temperature=ctx.cfg.teacher.temperature,
                                   seed=_int_seed(ctx.cfg.seed, "judge", task.id, position, attempt))
        reply = await ctx.teacher.chat(request)
        outcomes["judgments"] += 1
        if truncated(reply):
            outcomes["truncated"] += 1
            continue
        result = parse_judgment(reply)
        if not isinstance(result, Judgment):
            outcomes[f"unreadable:{result.kind.value}"] += 1
            continue
        if result.preferred is None:
            outcomes["tie"] += 1
            continue
        if result.preferred != position:
            outcomes["prefers_negative"] += 1
            continue
        if not result.reasoning.strip():
            outcomes["empty_reasoning"] += 1
            continue
        outcomes["accepted"] += 1
        trace = Trace(result.reasoning.strip(), position, (result.score_a, result.score_b),
                      "teacher:" + str(ctx.teacher.identity.get("model")))
        return trace.to_json(), outcomes
    return None, outcomes


async def process_task(task: PairTask, ctx: Context) -> dict[str, Any]:
    """Everything one task produces, as the JSON line written to the work log."""
    rejected, provenance, reasons = await make_negative(task, ctx)
    record: dict[str, Any] = {"id": task.id, "rejected": rejected, "negative": provenance,
                              "failed_tries": dict(reasons), "traces": {}, "trace_outcomes": {}}
    # With reader traces the teacher only makes negatives: traces come from the measured evidence.
    if rejected is not None and task.needs_trace and ctx.teacher.can_generate and ctx.cfg.traces.style != "reader":
        orders = ["A", "B"] if ctx.cfg.traces.orders == "both" else [task.planned_position]
        outcomes: Counter = Counter()
        for position in orders:
            trace, got = await teacher_trace(task, rejected, position, ctx)
            outcomes.update(got)
            record["traces"][position] = trace
            if trace is None:
                break  # the pair already fails "both orders"; save the teacher's time
        record["trace_outcomes"] = dict(outcomes)
    return record


def _result_problem(obj: Any) -> tuple[str | None, str] | None:
    """``(field, what is wrong)`` for a work-log record that assembly cannot use, else None."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {'null' if obj is None else type(obj).__name__}"
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        return "id", "field 'id' is missing" if "id" not in obj else "field 'id': expected a non-empty string"
    if "rejected" not in obj or not (obj["rejected"] is None or isinstance(obj["rejected"], str)):
        return "rejected", "field 'rejected': expected a string or null"
    for name, required in (("negative", True), ("failed_tries", True), ("traces", False), ("trace_outcomes", False)):
        if (required or name in obj) and not isinstance(obj.get(name), dict):
            return name, f"field {name!r}: expected an object" + ("" if name in obj else ", missing")
    return None


class WorkLog:
    """Append-only JSONL of finished tasks, one line per task, resumable after any kill.

    Reading keeps every valid line. A torn last line (the run was killed while writing it)
    and any corrupt line elsewhere (bad JSON, a record without the fields assembly needs) are
    reported with their line number and field, and dropped, so that only their tasks are
    recomputed; the file is then rewritten atomically without them.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return done
        chunks = self.path.read_bytes().split(b"\n")
        torn = chunks.pop()  # b"" when the file ends with a newline, as every complete write does
        kept: list[bytes] = []
        dropped = 0
        for lineno, line in enumerate(chunks, start=1):
            if not line.strip():
                dropped += 1
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
                obj, problem = None, (None, f"invalid JSON ({getattr(exc, 'msg', None) or type(exc).__name__})")
            else:
                problem = _result_problem(obj)
            if problem is not None:
                field, what = problem
                logger.warning("work log %s:%d: corrupt line of %d (%s%s): dropped, only its task will be "
                               "recomputed; the other lines are kept", self.path, lineno, len(chunks), what,
                               f"; field {field!r}" if field and field not in what else "")
                dropped += 1
                continue
            if obj["id"] in done:  # cannot happen with one writer; keep the first, as assembly would
                dropped += 1
                continue
            done[obj["id"]] = obj
            kept.append(line + b"\n")
        if torn:
            logger.warning("work log %s:%d: dropped a torn last line (%d bytes; the run was killed while "
                           "writing it); its task will be recomputed", self.path, len(chunks) + 1, len(torn))
        if torn or dropped:
            write_bytes_atomic(self.path, b"".join(kept))
        return done

    def open(self):
        return open(self.path, "a", encoding="utf-8")


async def _generate(todo: list[PairTask], ctx: Context, log: WorkLog, bar: Any) -> tuple[int, int]:
    """Run tasks with bounded concurrency; returns (finished, deferred)."""
    from .teachers import TeacherError

    queue: asyncio.Queue = asyncio.Queue()
    for t in todo:
        queue.put_nowait(t)
    finished = deferred = 0
    workers = max(1, ctx.teacher.concurrency if ctx.teacher.can_generate else 1)
    with log.open() as fh:
        async def worker() -> None:
            nonlocal finished, deferred
            while True:
                try:
                    task = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    record = await process_task(task, ctx)
                except TeacherError as exc:
                    deferred += 1
                    logger.warning("task %s deferred: %s", task.id, exc)
                    continue
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
                finished += 1
                bar.update(1)

        jobs = [asyncio.create_task(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*jobs)
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
    return finished, deferred


# --------------------------------------------------------------------------- assembly

def _dedup_key(task: PairTask, rejected: str) -> str:
    return hashlib.sha256("\x00".join([task.author, " ".join(task.prompt.split()), " ".join(task.chosen.split()),
                                       " ".join(rejected.split())]).encode()).hexdigest()


def assemble(plan: Plan, results: dict[str, dict[str, Any]], cfg: SynthConfig, teacher_identity: dict[str, Any],
             evidence: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Rows for every output file, and the statistics for the manifest. Pure.

    ``evidence``: measured evidence by pair id (``first`` the real text), stored on every row that has one
    and read by ``--traces.style reader``."""
    evidence = evidence or {}
    planned: dict[str, Counter] = defaultdict(Counter)
    counts: dict[str, Counter] = defaultdict(Counter)
    rejected_pairs: dict[str, Counter] = defaultdict(Counter)
    failed_tries: dict[str, Counter] = defaultdict(Counter)
    trace_outcomes: Counter = Counter()
    seen: set[str] = set()
    duplicates = 0
    pairs: list[PairRecord] = []
    by_id: dict[str, tuple[PairTask, dict[str, Any]]] = {}
    for task in plan.tasks:
        planned[task.split][task.negative_type] += 1
        res = results[task.id]
        failed_tries[task.negative_type].update(res["failed_tries"])
        trace_outcomes.update(res.get("trace_outcomes", {}))
        if res["rejected"] is None:
            reason = max(res["failed_tries"].items(), key=lambda kv: (kv[1], kv[0]))[0] \
                if res["failed_tries"] else "unknown"
            rejected_pairs[task.negative_type][reason] += 1
            continue
        key = _dedup_key(task, res["rejected"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        extra = {"split": task.split, "work": task.work, "idx": task.idx,
                 "exemplar_refs": list(task.exemplar_refs), "negative": res["negative"]}
        if task.same_work_exemplars:
            extra["same_work_exemplars"] = True
        if task.id in evidence:
            extra["evidence"] = evidence[task.id]
        pairs.append(PairRecord(task.id, task.author, list(task.exemplars), task.prompt, task.chosen,
                                res["rejected"], task.negative_type, extra))
        by_id[task.id] = (task, res)
        counts[task.split][task.negative_type] += 1

    files: dict[str, list[dict[str, Any]]] = {"pairs.jsonl": [p.to_json() for p in pairs]}
    for split, name in (("train", "rl.jsonl"), ("validation", "rl_validation.jsonl")):
        rl = [p for p in pairs if p.extra["split"] == split]
        rl.sort(key=lambda p: seeded_key(cfg.seed, "rl_order", p.id))  # a prefix covers every author
        files[name] = [p.to_json() for p in rl]

    reader = cfg.traces.style == "reader"
    use_teacher = teacher_identity.get("backend") != "offline" and not reader
    trace_stats: dict[str, Any] = {"kind": "teacher" if use_teacher else "reader" if reader else "bootstrap",
                                   "splits": list(cfg.traces.splits)}
    attempted = accepted = 0
    bootstrap: Counter = Counter()   # evidence-trace outcomes of the pairs that fell back to one
    positions: Counter = Counter()
    brief = cfg.traces.style == "brief"
    for split, name in (("train", "sft.jsonl"), ("validation", "sft_validation.jsonl")):
        rows: list[dict[str, Any]] = []
        if split in cfg.traces.splits:
            eligible = [p for p in pairs if p.extra["split"] == split]
            attempted += len(eligible)
            teacher_traces: dict[str, dict[str, Any] | None] = {}
            for p in eligible:
                task, res = by_id[p.id]
                traces = res.get("traces", {})
                needed = ["A", "B"] if cfg.traces.orders == "both" else [task.planned_position]
                teacher_traces[p.id] = traces if use_teacher and all(traces.get(pos) for pos in needed) else None
            # Without a teacher every pair may get an evidence trace; with one, only those the teacher
            # failed on (--traces.fallback bootstrap). The evidence decides first, so that A/B positions
            # are balanced over the traces actually written.
            fallback_ok = cfg.traces.fallback == "bootstrap" or not use_teacher
            keep = []
            for p in eligible:
                if teacher_traces[p.id] is not None:
                    keep.append(p)
                elif fallback_ok:
                    outcome = (_reader_outcome(p) if reader else
                               evidence_trace(p.exemplars, p.prompt, p.chosen, p.rejected, "A").outcome)
                    bootstrap[outcome] += 1
                    if outcome == "favours_real":
                        keep.append(p)
            balanced = assign_positions([p.id for p in keep], cfg.seed)
            for p, pos in zip(keep, balanced):
                task = by_id[p.id][0]
                traces = teacher_traces[p.id]
                if traces is not None:
                    if cfg.traces.orders == "one":
                        pos = task.planned_position
                    written = [(pos, traces[pos])]
                    accepted += 1
                else:
                    orders = (pos, "B" if pos == "A" else "A") if cfg.traces.both_orders else (pos,)
                    written = []
                    for o in orders:
                        if reader:
                            written.append((o, _reader_trace(p, o).to_json()))
                            continue
                        t = evidence_trace(p.exemplars, p.prompt, p.chosen, p.rejected, o, brief=brief)
                        written.append((o, Trace(t.reasoning, o, t.scores, "bootstrap:evidence").to_json()))
                for o, trace in written:
                    positions[o] += 1
                    row = p.to_json()
                    row["trace"] = trace
                    rows.append(row)
        # Seeded shuffle: consecutive rows never belong to one author, so --data.max_samples (a prefix)
        # still covers every author.
        rows.sort(key=lambda row: seeded_key(cfg.seed, "sft_order", row["id"], row["trace"]["chosen_position"]))
        files[name] = rows
    n_boot = sum(bootstrap.values())
    trace_stats.update({
        "pairs_attempted": attempted,
        "pairs_with_trace": accepted + bootstrap["favours_real"],
        "teacher_accepted": accepted,
        # Teacher judgments that ranked the real text higher, over the pairs they were tried on;
        # None without a teacher (nothing was accepted by anyone).
        "acceptance_rate": round(accepted / attempted, 4) if use_teacher and attempted else None,
        "bootstrap_fallback": n_boot,
        "bootstrap_written": bootstrap["favours_real"],
        # Pairs whose evidence favours the other text or ties get no bootstrap trace.
        "bootstrap_skipped": {k: bootstrap[k] for k in ("evidence_disagrees", "evidence_tied") if bootstrap[k]},
        "bootstrap_evidence_agreement": round(bootstrap["favours_real"] / n_boot, 4) if n_boot else None,
        "rows_per_pair": 2 if cfg.traces.both_orders else 1,
        "positions": dict(sorted(positions.items())),
    })
    if use_teacher:
        judgments = trace_outcomes.get("judgments", 0)
        trace_stats["judgments"] = dict(sorted(trace_outcomes.items()))
        trace_stats["judgment_acceptance_rate"] = (round(trace_outcomes.get("accepted", 0) / judgments, 4)
                                                   if judgments else None)
    stats = {
        "planned": {s: dict(sorted(planned[s].items())) for s in SPLITS if planned[s]},
        "counts": {s: dict(sorted(counts[s].items())) for s in SPLITS if counts[s]},
        "rejected_pairs": {t: dict(sorted(c.items())) for t, c in sorted(rejected_pairs.items())},
        "failed_tries": {t: dict(sorted(c.items())) for t, c in sorted(failed_tries.items()) if c},
        "pair_duplicates_removed": duplicates,
        "same_work_exemplars": {s: n for s in SPLITS
                                if (n := sum(p.extra.get("split") == s and bool(p.extra.get("same_work_exemplars"))
                                             for p in pairs))},
        "traces": trace_stats,
    }
    if evidence:
        stats["evidence"] = evidence_report(pairs)
    return files, stats


def _reader_outcome(pair: PairRecord) -> str:
    """Whether the fixed reader, reading the pair's evidence, picks the real text (a trace can be written)."""
    from openrlhf_persrm.evidence import read_evidence

    ev = pair.evidence
    if ev is None:
        return "no_evidence"
    preferred = read_evidence(ev).preferred
    return "favours_real" if preferred == "A" else "evidence_tied" if preferred is None else "evidence_disagrees"


def _reader_trace(pair: PairRecord, position: str) -> Trace:
    """The evidence-informed judge's reasoning for ``pair`` with the real text at ``position``."""
    from openrlhf_persrm.evidence import read_evidence
    from openrlhf_persrm.judge_format import evidence_reasoning

    ev = pair.evidence.arranged(position)
    made = evidence_reasoning(read_evidence(ev), ev)
    assert made is not None, "only pairs whose reading favours the real text get a trace"
    reasoning, scores = made
    return Trace(reasoning, position, scores, "bootstrap:reader")


def evidence_report(pairs: Sequence[PairRecord]) -> dict[str, Any]:
    """Per split and negative type: how often each measure alone (and the fixed reader) picks the real text."""
    from openrlhf_persrm.evidence.measures import measure_accuracy

    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for p in pairs:
        ev = p.evidence
        if ev is not None:
            groups[str(p.extra.get("split"))][p.negative_type].append(ev)
            groups[str(p.extra.get("split"))]["all"].append(ev)
    scorers = sorted({ev.scorer for g in groups.values() for evs in g.values() for ev in evs})
    out: dict[str, Any] = {"scorer": scorers[0] if len(scorers) == 1 else scorers,
                           "pairs": sum(len(g["all"]) for g in groups.values())}
    for split in SPLITS:
        if split in groups:
            out[split] = {t: {"n": len(evs), **measure_accuracy(evs)} for t, evs in sorted(groups[split].items())}
    return out


EVIDENCE_LOG = "evidence.jsonl"


def measure_evidence(plan: Plan, results: dict[str, dict[str, Any]], cfg: SynthConfig, work_dir: Path,
                     ) -> dict[str, dict[str, Any]]:
    """Evidence for every pair that got a negative, by pair id; resumable (``.work/evidence.jsonl``
    is appended chunk by chunk, and a rerun measures only what is missing)."""
    from tqdm.auto import tqdm

    from openrlhf_persrm.evidence import EvidenceInput, build_scorer, jobs_needed, measure_pairs

    path = work_dir / EVIDENCE_LOG
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
                done[obj["id"]] = obj["evidence"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: measured again
    todo = [t for t in plan.tasks if results[t.id]["rejected"] is not None and t.id not in done]
    if not todo:
        return done
    e = cfg.evidence
    scorer = build_scorer(model=e.scorer, endpoint=e.endpoint, served_model=e.served_model,
                          **({"batch_size": e.batch_size, "dtype": e.dtype, "max_context_tokens": e.max_context_tokens}
                             if e.scorer else {}))
    items = [EvidenceInput(t.exemplars, t.prompt, t.chosen, results[t.id]["rejected"]) for t in todo]
    bar = tqdm(total=jobs_needed(items), desc="evidence", unit="text", disable=not cfg.progress, dynamic_ncols=True)
    chunk = 32
    try:
        with open(path, "a", encoding="utf-8") as fh:
            for start in range(0, len(todo), chunk):
                measured = measure_pairs(scorer, items[start:start + chunk], progress=bar)
                for task, ev in zip(todo[start:start + chunk], measured):
                    done[task.id] = ev.to_json()
                    fh.write(json.dumps({"id": task.id, "evidence": done[task.id]}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        bar.close()
    return done


def headline_types(cfg: SynthConfig) -> dict[str, list[str]]:
    """Which negative types a headline number may include.

    A type whose negative does not answer the pair's prompt can be told apart by topic
    (``cross_author`` with ``--pairs.cross_author_prompt continuation``): it is reported, but
    left out of headline numbers.
    """
    topic = [t for t in cfg.pairs.negative_types
             if t == "cross_author" and cfg.pairs.cross_author_prompt == "continuation"]
    return {"headline": [t for t in cfg.pairs.negative_types if t not in topic], "topic_separable": topic}


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the run

def build_teacher(cfg: SynthConfig, work_dir: Path) -> Any:
    from .teachers import CachedTeacher, OfflineTeacher, OpenAITeacher, ResponseCache, TransformersTeacher

    t = cfg.teacher
    if t.backend == "offline":
        return OfflineTeacher()
    if t.backend == "openai":
        inner: Any = OpenAITeacher(base_url=t.base_url, model=t.model, api_key=os.environ.get(t.api_key_env),
                                   concurrency=t.concurrency, timeout=t.timeout, retries=t.retries,
                                   backoff=t.backoff)
    else:
        inner = TransformersTeacher(t.model, gguf_file=t.gguf_file, threads=t.threads, concurrency=t.concurrency)
    if t.cache:
        return CachedTeacher(inner, ResponseCache(str(work_dir / "teacher_cache.sqlite")))
    return inner


def load_input(cfg: SynthConfig) -> Corpus:
    path = demo_corpus_path() if cfg.input == "demo" else cfg.input
    return load_corpus(path)


def run_synth(cfg: SynthConfig, *, teacher: Any = None) -> dict[str, Any]:
    """Run (or resume) a synthesis; returns the manifest. Raises :class:`IncompleteRun` when
    tasks were deferred because the teacher could not be reached (rerun to finish)."""
    started = time.time()
    out_dir = Path(cfg.output_dir)
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir, OUTPUT_FILES)
    remove_stale_tmp(work_dir, WORK_FILES)

    corpus = load_input(cfg)
    paragraphs = select_paragraphs(corpus.paragraphs, cfg)
    if "minor_replacement" in cfg.pairs.negative_types:
        from .lexicon import find_wordnet_dir, load_wordnet
        wordnet = load_wordnet(find_wordnet_dir(cfg.pairs.wordnet_dir))
    else:
        wordnet = None
    plan = plan_tasks(paragraphs, cfg, wordnet)
    if not plan.tasks:
        raise ValueError("no pair can be made from this input with these settings (see --corpus.* and "
                         "--pairs.min_continuation_words); use more paragraphs per author")

    # The input is identified by its content (input_sha256): the same corpus named by another path resumes.
    signature = {"format": FORMAT, "config": {k: v for k, v in content_config(cfg).items() if k != "input"},
                 "input_sha256": corpus.sha256,
                 "code_version": code_version(), "tasks": len(plan.tasks)}
    signature = json.loads(json.dumps(signature))  # compare as stored: tuples become lists
    sig_path = work_dir / "signature.json"
    if sig_path.exists():
        try:
            previous = json.loads(sig_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8: not a file this code wrote
            raise ValueError(f"{sig_path}: unreadable ({exc}); it records the settings of the run in "
                             f"--output_dir={cfg.output_dir!r}: choose a new --output_dir, or delete "
                             f"{work_dir} to start this one over") from None
        if previous != signature:
            changed = sorted(k for k in signature if previous.get(k) != signature[k])
            raise ValueError(f"--output_dir={cfg.output_dir!r} holds a run with different {', '.join(changed)}; "
                             "rerun with the same settings to resume, or choose a new --output_dir")
    else:
        write_jsonl_text(sig_path, json.dumps(signature, indent=2, sort_keys=True))

    own_teacher = teacher is None
    if teacher is None:
        teacher = build_teacher(cfg, work_dir)
    log = WorkLog(work_dir / "results.jsonl")
    done = log.load()
    todo = [t for t in plan.tasks if t.id not in done]
    ctx = Context(cfg, plan, teacher, wordnet)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan.tasks), initial=len(plan.tasks) - len(todo), desc="synth", unit="pair",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        finished, deferred = asyncio.run(_run_and_close(todo, ctx, log, bar, own_teacher))
    finally:
        bar.close()
    elapsed = time.time() - started
    run_stats = {"elapsed_s": round(elapsed, 2), "tasks_total": len(plan.tasks),
                 "tasks_done_before": len(plan.tasks) - len(todo), "tasks_finished_now": finished,
                 "tasks_deferred": deferred, "teacher_stats": dict(teacher.stats)}
    with open(work_dir / "run_stats.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(run_stats) + "\n")
    if deferred:
        raise IncompleteRun(f"{deferred} of {len(plan.tasks)} tasks could not reach the teacher after retries; "
                            "rerun the same command to finish them (finished work is kept)")

    results = log.load()
    evidence = measure_evidence(plan, results, cfg, work_dir) if cfg.evidence.enabled else None
    files, stats = assemble(plan, results, cfg, teacher.identity, evidence)
    for name, rows in files.items():
        if name in ("pairs.jsonl", "rl.jsonl", "rl_validation.jsonl", "sft.jsonl", "sft_validation.jsonl"):
            write_pairs(out_dir / name, rows)
    manifest = {
        "format": FORMAT,
        "config": content_config(cfg),
        "input": {"path": cfg.input, "sha256": corpus.sha256, "schema": corpus.schema, "lines": corpus.lines,
                  "paragraphs": len(corpus.paragraphs), "corpus_duplicates_dropped": corpus.duplicates_dropped,
                  "paragraphs_used": len(paragraphs), "authors_used": len({p.author for p in paragraphs})},
        "code_version": code_version(),
        "teacher": teacher.identity,
        "splits": _split_summary(plan),
        "planning_skipped": dict(sorted(plan.skipped.items())),
        **stats,
        "negative_types": headline_types(cfg),
        # How far surface artefacts (fitted on train) and character n-grams tell real from negative text,
        # per test split and type: near 0.5 for artefacts means no typography/length/truncation shortcut.
        "shortcuts": shortcut_report(files["pairs.jsonl"]),
        "outputs": {name: {"rows": len(rows), "sha256": _sha256_file(out_dir / name)}
                    for name, rows in files.items()},
    }
    write_jsonl_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False))
    logger.info("synth: %d pairs, %d sft rows in %.1fs -> %s", len(files["pairs.jsonl"]),
                len(files["sft.jsonl"]), elapsed, out_dir)
    return manifest


async def _run_and_close(todo, ctx, log, bar, own_teacher: bool):
    try:
        return await _generate(todo, ctx, log, bar)
    finally:
        if own_teacher:
            await ctx.teacher.aclose()


def _split_summary(plan: Plan) -> dict[str, Any]:
    by_uid = {p.uid: p for p in plan.paragraphs}
    out: dict[str, Any] = {}
    for split in SPLITS:
        members = [by_uid[u] for u in plan.splits.members(split)]
        if not members:
            continue
        out[split] = {"authors": len({p.author for p in members}), "paragraphs": len(members),
                      "exemplar_only": sum(p.uid in plan.splits.exemplar_only for p in members)}
    out["unseen_authors"] = list(plan.splits.unseen_authors)
    out["unseen_works"] = dict(sorted(plan.splits.unseen_works.items()))
    return out


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file + rename); a kill leaves the old file or the new one, and at
    worst a ``.NAME.tmp`` that :func:`~openrlhf_persrm.pairs.remove_stale_tmp` deletes on the next run."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file + rename)."""
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))
