"""The PersRM pair format: the project's interchange format, read and written as JSONL.

One JSON object per line::

    {"id": str, "author": str, "exemplars": [str, ...], "prompt": str,
     "chosen": str, "rejected": str, "negative_type": str, ...}

``chosen`` is always the person's real text. Which of the two is shown as response A or
B is decided when judge prompts are built (:func:`openrlhf_persrm.judge_format.assign_positions`),
never stored as truth. Fields beyond the required ones are kept verbatim in
:attr:`PairRecord.extra` and written back out.

Stage-1 (SFT) rows are pair records that also carry a reasoning trace for one A/B order,
in ``extra["trace"]``; see :class:`Trace`.

Reading validates every line; a bad line raises :class:`PairFormatError` naming the file,
the line, the field and what was expected. With ``skip_invalid=True`` bad lines are
skipped, but counted and reported in a :class:`ReadReport`, never dropped silently.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

REQUIRED_FIELDS: tuple[str, ...] = (
    "id", "author", "exemplars", "prompt", "chosen", "rejected", "negative_type",
)

#: Negative types produced by ``data_synth``. Other non-empty names are accepted, so
#: users can bring their own kinds of rejected responses.
KNOWN_NEGATIVE_TYPES: tuple[str, ...] = (
    "minor_replacement", "style_mimic", "style_random", "cross_author",
)

POSITIONS = ("A", "B")


class PairFormatError(ValueError):
    """A record does not follow the pair format. The message says where and why."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True)
class Trace:
    """A reasoning trace for one A/B order of a pair: what stage 1 (SFT) learns to write.

    ``chosen_position`` says where the real text was shown; ``scores`` are the final
    ``[score_A, score_B]`` and must rank the real text strictly higher.
    """

    reasoning: str
    chosen_position: str
    scores: tuple[int, int]
    source: str = "unknown"  # e.g. "teacher:<model>" or "bootstrap:stylometry"

    def to_json(self) -> dict[str, Any]:
        return {"reasoning": self.reasoning, "chosen_position": self.chosen_position,
                "scores": list(self.scores), "source": self.source}

    @classmethod
    def from_json(cls, obj: Any) -> "Trace":
        if not isinstance(obj, dict):
            raise PairFormatError(f"field 'trace': expected an object, got {_type(obj)}",
                                  field="trace")
        reasoning = obj.get("reasoning")
        if not isinstance(reasoning, str) or not reasoning.strip():
            raise PairFormatError("field 'trace.reasoning': expected a non-empty string",
                                  field="trace.reasoning")
        pos = obj.get("chosen_position")
        if pos not in POSITIONS:
            raise PairFormatError(
                f"field 'trace.chosen_position': expected 'A' or 'B', got {pos!r}",
                field="trace.chosen_position")
        scores = obj.get("scores")
        if (not isinstance(scores, (list, tuple)) or len(scores) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 10
                           for s in scores)):
            raise PairFormatError(
                f"field 'trace.scores': expected [score_A, score_B], integers 1-10, got {scores!r}",
                field="trace.scores")
        chosen, other = (scores[0], scores[1]) if pos == "A" else (scores[1], scores[0])
        if chosen <= other:
            raise PairFormatError(
                f"field 'trace.scores': {list(scores)} does not rank the real text "
                f"(position {pos}) strictly higher", field="trace.scores")
        source = obj.get("source", "unknown")
        return cls(reasoning, pos, (scores[0], scores[1]), str(source))


@dataclass
class PairRecord:
    """One preference pair: a person's exemplars, a prompt, their real text and a negative."""

    id: str
    author: str
    exemplars: list[str]
    prompt: str
    chosen: str
    rejected: str
    negative_type: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_fields(self.to_json())

    @property
    def trace(self) -> Trace | None:
        raw = self.extra.get("trace")
        return None if raw is None else Trace.from_json(raw)

    @property
    def evidence(self) -> "PairEvidence | None":
        """The measured evidence on ``chosen`` (first) and ``rejected`` (second), if the row carries it
        (``persrm synth --evidence.scorer``, ``persrm evidence``)."""
        raw = self.extra.get("evidence")
        if raw is None:
            return None
        from .evidence.measures import PairEvidence

        return PairEvidence.from_json(raw)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "author": self.author, "exemplars": list(self.exemplars),
            "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
            "negative_type": self.negative_type,
        }
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "PairRecord":
        validate_fields(obj)
        extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
        if "trace" in extra:
            Trace.from_json(extra["trace"])
        return cls(**{k: obj[k] for k in REQUIRED_FIELDS}, extra=extra)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def validate_fields(obj: Any) -> None:
    """Raise :class:`PairFormatError` unless ``obj`` holds every required field, well typed."""
    if not isinstance(obj, dict):
        raise PairFormatError(f"expected a JSON object, got {_type(obj)}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise PairFormatError(f"field {name!r} is missing (required: {', '.join(REQUIRED_FIELDS)})",
                                  field=name)
        value = obj[name]
        if name == "exemplars":
            if not isinstance(value, list) or not value:
                raise PairFormatError(
                    f"field 'exemplars': expected a non-empty list of strings, got {_type(value)}"
                    + (" (empty)" if value == [] else ""), field=name)
            for i, ex in enumerate(value):
                if not isinstance(ex, str) or not ex.strip():
                    raise PairFormatError(
                        f"field 'exemplars[{i}]': expected a non-empty string, got {_type(ex)}",
                        field=name)
        elif not isinstance(value, str):
            raise PairFormatError(f"field {name!r}: expected a string, got {_type(value)}", field=name)
        elif name != "prompt" and not value.strip():
            # An empty prompt is legitimate (free writing); empty text elsewhere is not.
            raise PairFormatError(f"field {name!r}: expected a non-empty string", field=name)
    if obj["chosen"] == obj["rejected"]:
        raise PairFormatError("fields 'chosen' and 'rejected' are identical: not a preference pair",
                              field="rejected")


@dataclass
class ReadReport:
    """What a lenient read skipped, by reason. ``str(report)`` is a one-line summary."""

    path: str
    read: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def add(self, error: PairFormatError) -> None:
        self.skipped += 1
        self.reasons[error.field or "json"] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(error))

    def __str__(self) -> str:
        if not self.skipped:
            return f"{self.path}: read {self.read} pairs, skipped none"
        why = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
        return f"{self.path}: read {self.read} pairs, skipped {self.skipped} invalid ({why})"


def _parse_line(raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PairFormatError(f"not UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start + 1} of the line); "
                              "save the file as UTF-8", field="encoding") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise PairFormatError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise PairFormatError("JSON nested too deeply to read (a pair is a flat object of strings and a list "
                              "of strings)") from None


def read_pairs(path: str | os.PathLike, *, skip_invalid: bool = False,
               report: ReadReport | None = None) -> Iterator[PairRecord]:
    """Yield the pair records of a JSONL file, validating each line.

    A bad line raises :class:`PairFormatError` (file, line, field, expectation) unless
    ``skip_invalid`` is set; then it is skipped and counted in ``report``.

    >>> import tempfile, json
    >>> p = tempfile.mktemp(suffix=".jsonl")
    >>> _ = open(p, "w").write(json.dumps({"id": "1", "author": "a", "exemplars": ["x"],
    ...     "prompt": "p", "chosen": "c", "rejected": "r", "negative_type": "cross_author"}) + "\\n")
    >>> [r.id for r in read_pairs(p)]
    ['1']
    """
    path = str(path)
    if report is None:
        report = ReadReport(path)
    if os.path.isdir(path):
        raise PairFormatError("is a directory, not a pair file (.jsonl)", path=path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = _parse_line(raw)
                record = PairRecord.from_json(obj)
            except PairFormatError as exc:
                located = PairFormatError(str(exc), path=path, line=lineno, field=exc.field)
                if not skip_invalid:
                    raise located from None
                report.add(located)
                continue
            report.read += 1
            yield record


def load_pairs(path: str | os.PathLike, *, skip_invalid: bool = False) -> tuple[list[PairRecord], ReadReport]:
    """Read a whole pair file; returns the records and the report of what was skipped."""
    report = ReadReport(str(path))
    return list(read_pairs(path, skip_invalid=skip_invalid, report=report)), report


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return count


def stale_tmp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temporary files that a write of one of ``names`` killed midway left in ``folder``:
    ``.NAME.XXXX.tmp`` (:func:`write_jsonl`), ``.NAME.tmp`` and ``NAME.tmp`` (small JSON writers)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = set(names)
    found = []
    for path in folder.iterdir():
        n = path.name
        if not n.endswith(".tmp") or not path.is_file():
            continue
        stem = n[:-len(".tmp")]
        if stem in wanted or (stem.startswith(".") and (stem[1:] in wanted or stem[1:].rsplit(".", 1)[0] in wanted)):
            found.append(path)
    return sorted(found)


def remove_stale_tmp(folder: str | os.PathLike, names: Iterable[str]) -> int:
    """Delete what :func:`stale_tmp_files` finds; call it at the start of a run that owns ``folder``
    (one writer per folder). Returns how many files were removed."""
    import logging

    removed = 0
    for path in stale_tmp_files(folder, names):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        logging.getLogger(__name__).info("removed %s, left by a run killed while writing it", path)
    return removed


def write_pairs(path: str | os.PathLike, records: Iterable[PairRecord | dict[str, Any]]) -> int:
    """Validate and write pair records; returns how many were written."""

    def rows() -> Iterator[dict[str, Any]]:
        for i, rec in enumerate(records):
            if isinstance(rec, dict):
                try:
                    rec = PairRecord.from_json(rec)
                except PairFormatError as exc:
                    raise PairFormatError(f"record {i}: {exc}", path=str(path), field=exc.field) from None
            yield rec.to_json()

    return write_jsonl(path, rows())
