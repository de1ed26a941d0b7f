"""Rebuild the built-in demo corpus (``openrlhf_persrm/data/demo_corpus.jsonl``) from the
shared author corpus, reproducibly: ``python -m data_synth.demo_corpus SRC.jsonl.gz DST.jsonl``.

For each (author, work) in :data:`DEMO_WORKS`, the paragraphs of the work are taken in
reading order, the first ``skip`` are skipped (front matter, chapter openings), and the
next ``per_work`` consecutive ones are kept; one-work authors get two such runs.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from .corpus import iter_corpus_lines

#: Ten authors of clearly different styles: novel, essay, speech, dialect, modernism. The demo holds out
#: three of them (franklin_d_roosevelt, lm_montgomery, robert_louis_stevenson), people the shipped judge
#: (openrlhf_persrm/data/judges) never trained on either: they are in the development study's held-out authors.
DEMO_WORKS: tuple[tuple[str, str], ...] = (
    ("jane_austen", "persuasion"), ("jane_austen", "emma"),
    ("mark_twain", "adventures_of_huckleberry_finn"), ("mark_twain", "the_adventures_of_tom_sawyer"),
    ("robert_louis_stevenson", "treasure_island"), ("robert_louis_stevenson", "dr_jekyll_and_mr_hyde"),
    ("alexander_hamilton", "federalist_83"), ("alexander_hamilton", "federalist_06"),
    ("alexander_hamilton", "federalist_70"),
    ("franklin_d_roosevelt", "state_of_the_union_1943"), ("franklin_d_roosevelt", "state_of_the_union_1945"),
    ("arthur_conan_doyle", "a_study_in_scarlet"), ("arthur_conan_doyle", "the_hound_of_the_baskervilles"),
    ("lm_montgomery", "anne_of_green_gables"), ("lm_montgomery", "rainbow_valley"),
    ("james_joyce", "ulysses"),
    ("hg_wells", "the_time_machine"), ("hg_wells", "a_short_history_of_the_world"),
    ("mary_shelley", "frankenstein"), ("mary_shelley", "the_last_man"),
)


def select(src: str, *, per_author: int = 40, skip: int = 10) -> list[dict]:
    wanted = set(DEMO_WORKS)
    works_of: dict[str, list[str]] = defaultdict(list)
    for author, work in DEMO_WORKS:
        works_of[author].append(work)
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for _, _, rec in iter_corpus_lines(src):
        if (rec["author"], rec["work"]) in wanted:
            rows[(rec["author"], rec["work"])].append(rec)
    out: list[dict] = []
    for author, works in works_of.items():
        quota = per_author
        for i, work in enumerate(works):
            items = sorted(rows[(author, work)], key=lambda r: r["idx"])
            take = quota // (len(works) - i)
            quota -= take
            if len(works) == 1:  # two runs, far apart, so that splits have blocks to choose from
                half = take // 2
                mid = len(items) // 2
                out.extend(items[skip:skip + half] + items[mid:mid + take - half])
            else:
                start = min(skip, max(0, len(items) - take))
                out.extend(items[start:start + take])
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m data_synth.demo_corpus SRC.jsonl.gz DST.jsonl", file=sys.stderr)
        return 2
    rows = select(args[0])
    with open(args[1], "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"author": r["author"], "work": r["work"], "idx": r["idx"], "text": r["text"]},
                                ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} paragraphs to {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
