"""Copy sections of generated reports into the README, so that no result there is typed by hand.

A README block names its source, a section of a Markdown file that a command wrote (a pipeline's
report, ``benchmarks/run_all.py``'s results):

    <!-- generated from docs/study-smollm2-cpu-evidence.md#judges -->
    ...replaced by that file's "## Judges" section...
    <!-- end generated -->

``python -m openrlhf_persrm.docsync README.md`` rewrites every block from its source (relative links
and images are rewritten to stay valid from the README); ``--check`` only reports the blocks that
differ (exit 1), which the tests run, so a rerun report and a stale README cannot disagree unseen.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

BEGIN = re.compile(r"^<!-- generated from (?P<path>[^#\s]+)#(?P<anchor>[\w-]+) -->$")
END = "<!-- end generated -->"
_LINK = re.compile(r"(\]\()(?!https?://|#|/)([^)\s]+)(\))")


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def section(text: str, anchor: str) -> list[str]:
    """The body of the heading whose anchor is ``anchor`` (up to the next heading of its level or above)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m and slug(m.group(2)) == anchor:
            level = len(m.group(1))
            body = []
            for rest in lines[i + 1:]:
                h = re.match(r"^(#+)\s", rest)
                if h and len(h.group(1)) <= level:
                    break
                body.append(rest)
            while body and not body[0].strip():
                body.pop(0)
            while body and not body[-1].strip():
                body.pop()
            return body
    raise KeyError(anchor)


def _relink(line: str, source: Path, target: Path) -> str:
    def fix(m: re.Match) -> str:
        path = os.path.relpath(source.parent / m.group(2), target.parent)
        return m.group(1) + path.replace(os.sep, "/") + m.group(3)

    return _LINK.sub(fix, line)


def sync(readme: str | os.PathLike) -> tuple[str, list[str]]:
    """``readme``'s text with every generated block refreshed, and the names of the blocks that changed."""
    target = Path(readme)
    root = target.parent
    lines = target.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    changed: list[str] = []
    i = 0
    while i < len(lines):
        m = BEGIN.match(lines[i].strip())
        if not m:
            out.append(lines[i])
            i += 1
            continue
        try:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == END)
        except StopIteration:
            raise ValueError(f"{target}:{i + 1}: a generated block without `{END}`") from None
        source = root / m.group("path")
        name = f"{m.group('path')}#{m.group('anchor')}"
        try:
            body = section(source.read_text(encoding="utf-8"), m.group("anchor"))
        except OSError as exc:
            raise ValueError(f"{target}:{i + 1}: {name}: cannot read the source ({exc})") from None
        except KeyError:
            raise ValueError(f"{target}:{i + 1}: {name}: the source has no such section") from None
        body = [_relink(line, source, target) for line in body]
        if body != lines[i + 1:end]:
            changed.append(name)
        out += [lines[i]] + body + [lines[end]]
        i = end + 1
    return "\n".join(out) + "\n", changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    paths = [a for a in args if a != "--check"] or ["README.md"]
    stale = 0
    for path in paths:
        try:
            text, changed = sync(path)
        except ValueError as exc:
            print(f"docsync: {exc}", file=sys.stderr)
            return 2
        for name in changed:
            print(f"{path}: {'stale' if check else 'updated'} block from {name}")
        stale += len(changed)
        if changed and not check:
            Path(path).write_text(text, encoding="utf-8")
    if check and stale:
        print("rerun: python -m openrlhf_persrm.docsync " + " ".join(paths), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
