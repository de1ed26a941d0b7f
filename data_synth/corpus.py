"""Reading a corpus of real people's writing: an author corpus or simple per-user JSONL.

Two input schemas, one per line, plain or gzip-compressed (``.gz``, or gzip magic bytes):

* author corpus: ``{"author": str, "work": str, "idx": int, "text": str}`` (as in the
  shared ``paragraphs.jsonl.gz``); ``idx`` is the paragraph's position in its work;
* per-user: ``{"user": str, "text": str}``; each user's lines become one work, in file
  order, so "neighbouring paragraphs" means neighbouring lines.

Every line is validated; a bad line (bad JSON, nesting too deep to read, not UTF-8, a
missing or mistyped field, a damaged gzip stream) raises :class:`CorpusFormatError` naming
the file, the line, the field and what was expected. Names become path-safe ids
("Ann Lee" -> ``Ann_Lee``); two spellings that become one id ("Ann Lee", "Ann/Lee") are
refused with both spellings and their lines, never merged. Exact duplicate texts of one
author are dropped (and counted), so no paragraph can appear twice.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
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


def _open_binary(path: str) -> io.BufferedIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if path.endswith(".gz") or magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_failure(exc: BaseException) -> str:
    if isinstance(exc, gzip.BadGzipFile):
        return "not a valid gzip file"
    if isinstance(exc, EOFError):
        return "the gzip stream ends early (truncated)"
    if isinstance(exc, zlib.error):
        return "corrupt gzip data"
    return "read error"


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line_number, bytes)`` of a plain or gzip file; a read error names the line it stopped at."""
    if os.path.isdir(path):
        raise CorpusFormatError("is a directory, not a corpus file (pass --input PATH to a .jsonl or "
                                ".jsonl.gz file, or --input demo)", path=path, field="input")
    try:
        fh = _open_binary(path)
    except OSError as exc:
        raise CorpusFormatError(f"cannot open the file ({exc.strerror or exc})", path=path, field="input") from None
    lineno = 0
    with fh:
        while True:
            try:
                line = fh.readline()
            except (OSError, EOFError, zlib.error) as exc:
                raise CorpusFormatError(f"{_read_failure(exc)} after line {lineno} ({exc}); the file is damaged: "
                                        "recompress or re-download it", path=path, line=lineno + 1) from None
            if not line:
                return
            lineno += 1
            yield lineno, line


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
                                path=path, field="input")
    schema = None
    for lineno, raw in _raw_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusFormatError(f"not UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start + 1} "
                                    "of the line); save the corpus as UTF-8",
                                    path=path, line=lineno) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusFormatError(f"invalid JSON ({exc.msg} at column {exc.colno})",
                                    path=path, line=lineno) from None
        except RecursionError:
            raise CorpusFormatError("JSON nested too deeply to read; a corpus line is one flat object",
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


def _slug(name: str) -> str:
    # Author and work names end up in ids and uids ("author/work/idx"): keep them path-safe.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())


def _check_spelling(seen: dict, key: Any, name: str, what: str, field: str, path: str, line: int) -> None:
    """Refuse two different spellings that become the same id ("Ann Lee", "Ann_Lee", "Ann/Lee")."""
    first = seen.setdefault(key, (name.strip(), line))
    if first[0] != name.strip():
        slug = key[-1] if isinstance(key, tuple) else key
        raise CorpusFormatError(
            f"field {field!r}: {what} {name.strip()!r} and {first[0]!r} (line {first[1]}) both become the id "
            f"{slug!r} (ids keep letters, digits, '-', '_' and '.'); they would be merged into one {what}: "
            f"spell them the same if they are one {what}, or rename one", path=path, line=line, field=field)


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Read and validate a corpus file. Duplicate (author, work, idx) keys are an error, and so
    are two spellings of a name that become the same id; exact duplicate texts of one author
    are dropped and counted."""
    path = str(path)
    paragraphs: list[Paragraph] = []
    seen_keys: dict[tuple[str, str, int], int] = {}
    seen_text: set[tuple[str, str]] = set()
    spellings: dict[Any, tuple[str, int]] = {}
    user_counts: dict[str, int] = {}
    schema, lines, dropped = "author", 0, 0
    for lineno, schema, rec in iter_corpus_lines(path):
        lines += 1
        author = _slug(rec["author"])
        field = "author" if schema == "author" else "user"
        _check_spelling(spellings, author, rec["author"], field, field, path, lineno)
        if schema == "author":
            work, idx = _slug(rec["work"]), rec["idx"]
            _check_spelling(spellings, (author, work), rec["work"], "work", "work", path, lineno)
        else:
            work, idx = "writing", user_counts.get(author, 0)
            user_counts[author] = idx + 1
        key = (author, work, idx)
        if key in seen_keys:
            raise CorpusFormatError(
                f"field 'idx': author {rec['author'].strip()!r}, work {rec['work'].strip()!r}, idx {idx} already "
                f"appears on line {seen_keys[key]}; each (author, work, idx) must be unique",
                path=path, line=lineno, field="idx")
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
