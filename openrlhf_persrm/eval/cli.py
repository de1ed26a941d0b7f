"""``persrm eval``: a thin launcher over :func:`~.run.run_eval` and :func:`~.report.compare`.

    persrm eval --pairs FILE --judge {random,length,stylometry,model} [--model PATH | --endpoint URL]
                [--both_orders] [--split NAME] --out DIR
    persrm eval compare RUN1/metrics.json RUN2/metrics.json ... --out DIR [--labels A B ...]

Flags are the fields of :class:`~.config.EvalConfig`; multi-word flags take ``_`` or ``-``
(``--both_orders`` = ``--both-orders``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import Sequence

from .config import JUDGES, EvalConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persrm eval",
        # argparse %-formats argument help, never the description: a literal "%" here.
        description="Pairwise accuracy of a judge on PersRM pairs: overall, by negative type and by author, "
                    "with bootstrap 95% intervals, format failures and (with --both_orders) position "
                    "consistency. `persrm eval compare METRICS.json ... --out DIR` puts runs side by side.")
    for f in fields(EvalConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_text = f.metadata.get("help", "").replace("%", "%%")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        elif f.name == "judge":
            parser.add_argument(*names, dest=f.name, choices=JUDGES, required=True, help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=type(default), default=default,
                                help=f"{help_text} (default: %(default)s)" if default not in ("", None) else help_text)
    return parser


def make_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persrm eval compare",
                                     description="Several judges' metrics.json side by side (plot + Markdown table).")
    parser.add_argument("metrics", nargs="+", help="metrics.json files written by persrm eval")
    parser.add_argument("--out", required=True, help="folder for compare.png and compare.md")
    parser.add_argument("--labels", nargs="+", default=None, help="names of the judges, in the same order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..logs import setup_logging

    setup_logging("persrm eval")
    if argv and argv[0] == "compare":
        from .report import compare

        args = make_compare_parser().parse_args(argv[1:])
        try:
            md = compare(args.metrics, os.path.join(args.out, "compare.png"), os.path.join(args.out, "compare.md"),
                         labels=args.labels)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(md)
        print(f"wrote {args.out}/compare.md and {args.out}/compare.png")
        return 0

    args = make_parser().parse_args(argv)
    try:
        cfg = EvalConfig(**vars(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .run import run_eval

    try:
        run_eval(cfg)
    except (OSError, ValueError) as exc:  # PairFormatError is a ValueError and names file and line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. a judge backend that served no request at all
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
