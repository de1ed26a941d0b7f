"""Reading a corpus of real people's writing: an author corpus or simple per-user JSONL.

Two input schemas, one per line, plain or gzip-compressed (``.gz``, or gzip magic bytes):

* author corpus: ``{"author": str, "work": str, "idx": int, "text": str}`` (as in the
  shared ``paragraphs.jsonl.gz``); ``idx`` is the paragraph's position in its work;
* per-user: ``{"user": str, "text": str}``; each user's lines become one work, in file
  order, so "neighbouring paragraphs" means neighbouring lines.

Every line is validated; a bad line raises :class:`CorpusFormatError` naming the file,
the line, the field and what was expected. Exact duplicate texts of one author are
dropped (and counted), so no paragraph can appear twice.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator


class CorpusFormatError(ValueError):
    """A corpus line does not follow either input schema. The message says where and why."""

    def __init__(self, message: str, *, path: str, line: int | None = None, field: str | None = None):
        where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True)
class Paragraph:
    """One paragraph of real writing; ``uid`` is unique within the corpus."""

    author: str
    work: str
    idx: int
    text: str

    @property
    def uid(self) -> str:
        return f"{self.author}/{self.work}/{self.idx}"


@dataclass
class Corpus:
    paragraphs: list[Paragraph]
    path: str
    schema: str               # "author" or "user"
    sha256: str               # of the input file's bytes as stored (compressed or not)
    lines: int
    duplicates_dropped: int

    def authors(self) -> list[str]:
        return sorted({p.author for p in self.paragraphs})


def _open_text(path: str) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if path.endswith(".gz") or magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _nonempty_str(obj: dict, name: str, path: str, line: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if name not in obj else f"got {_type(value)}" + (" (empty)" if value == "" else "")
        raise CorpusFormatError(f"field {name!r}: expected a non-empty string, {got}",
                                path=path, line=line, field=name)
    return value


def iter_corpus_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(line_number, schema, record)`` for each non-blank line, validated."""
    path = str(path)
    if not os.path.exists(path):
        raise CorpusFormatError("file not found (pass --input PATH to a .jsonl or .jsonl.gz corpus)",
                                path=path)
    schema = None
    with _open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusFormatError(f"invalid JSON ({exc.msg} at column {exc.colno})",
                                            path=path, line=lineno) from None
                if not isinstance(obj, dict):
                    raise CorpusFormatError(f"expected a JSON object, got {_type(obj)}", path=path, line=lineno)
                this = "author" if "author" in obj else "user" if "user" in obj else None
                if this is None:
                    raise CorpusFormatError(
                        "field 'author' (author corpus: author, work, idx, text) or 'user' "
                        "(per-user: user, text) is missing", path=path, line=lineno, field="author")
                if schema is None:
                    schema = this
                elif this != schema:
                    raise CorpusFormatError(
                        f"mixes schemas: earlier lines have {schema!r}, this one has {this!r}; "
                        "use one schema per file", path=path, line=lineno, field=this)
                text = _nonempty_str(obj, "text", path, lineno)
                if schema == "author":
                    author = _nonempty_str(obj, "author", path, lineno)
                    work = _nonempty_str(obj, "work", path, lineno)
                    idx = obj.get("idx")
                    if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                        got = "missing" if "idx" not in obj else f"got {idx!r}"
                        raise CorpusFormatError(f"field 'idx': expected an integer >= 0, {got}",
                                                path=path, line=lineno, field="idx")
                    yield lineno, schema, {"author": author, "work": work, "idx": idx, "text": text}
                else:
                    user = _nonempty_str(obj, "user", path, lineno)
                    yield lineno, schema, {"author": user, "text": text}
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise CorpusFormatError(f"cannot read the file ({exc})", path=path) from None


def _slug(name: str) -> str:
    # Author and work names end up in ids and uids ("author/work/idx"): keep them path-safe.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Read and validate a corpus file. Duplicate (author, work, idx) keys are an error;
    exact duplicate texts of one author are dropped and counted."""
    path = str(path)
    paragraphs: list[Paragraph] = []
    seen_keys: dict[tuple[str, str, int], int] = {}
    seen_text: set[tuple[str, str]] = set()
    user_counts: dict[str, int] = {}
    schema, lines, dropped = "author", 0, 0
    for lineno, schema, rec in iter_corpus_lines(path):
        lines += 1
        author = _slug(rec["author"])
        if schema == "author":
            work, idx = _slug(rec["work"]), rec["idx"]
        else:
            work, idx = "writing", user_counts.get(author, 0)
            user_counts[author] = idx + 1
        key = (author, work, idx)
        if key in seen_keys:
            raise CorpusFormatError(
                f"field 'idx': ({author}, {work}, {idx}) already appears on line {seen_keys[key]}; "
                "each (author, work, idx) must be unique", path=path, line=lineno, field="idx")
        seen_keys[key] = lineno
        text = " ".join(rec["text"].split())
        if (author, text) in seen_text:
            dropped += 1
            continue
        seen_text.add((author, text))
        paragraphs.append(Paragraph(author, work, idx, text))
    if not paragraphs:
        raise CorpusFormatError("no paragraphs: the file is empty", path=path)
    paragraphs.sort(key=lambda p: (p.author, p.work, p.idx))
    return Corpus(paragraphs, path, schema, file_sha256(path), lines, dropped)
