"""The ``persrm`` command: ``persrm demo``, ``persrm synth``, ...

Each subcommand is a thin launcher: it parses flags into the component's config
dataclass and calls the library function.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Sequence


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, helps: dict[str, str]) -> None:
    for f in fields(cls):
        default = f.default
        parser.add_argument(f"--{f.name}", type=type(default) if default is not None else str, default=default,
                            help=f"{helps.get(f.name, '')} (default: %(default)s)")


DEMO_HELP = {
    "pairs": "pair JSONL to judge (default: the shipped demo pairs)",
    "model": "judge model: a local checkpoint or smollm2-135m-instruct",
    "limit": "judge at most this many pairs",
    "max_prompt_tokens": "token budget of a judge prompt (exemplars are dropped/trimmed to fit)",
    "max_new_tokens": "tokens the judge may write",
    "batch_size": "prompts generated together",
    "seed": "seed of the balanced A/B assignment",
    "out": "folder for judgments.jsonl and summary.json",
}


def make_parser() -> argparse.ArgumentParser:
    from ..demo import DemoConfig

    parser = argparse.ArgumentParser(prog="persrm", description="PersRM-R1 personalised reward models for OpenRLHF")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="judge the shipped demo pairs with SmolLM2 zero-shot")
    _add_dataclass_flags(demo, DemoConfig, DEMO_HELP)
    for name, text in (("synth", "synthesise PersRM pairs and traces from a corpus"),
                       ("eval", "pairwise accuracy of a judge on PersRM pairs, with CIs and plots"),
                       ("serve", "serve a PersRM judge over HTTP (OpenRLHF remote-RM protocol)")):
        sub.add_parser(name, help=f"{text} (see persrm {name} --help)", add_help=False)
    pipe = sub.add_parser("pipeline", help="run one experiment recipe (YAML) stage by stage")
    pipe.add_argument("recipe", help="a recipe file, e.g. recipes/demo-cpu.yaml")
    pipe.add_argument("--only", nargs="*", default=[], help="run only these stages (synth sft grpo policy eval)")
    pipe.add_argument("--workdir", default=None, help="override the recipe's workdir")
    pipe.add_argument("--input", default=None, help="override the recipe's synth.input (the corpus to train on)")
    pipe.add_argument("--judges", nargs="*", default=None,
                      help="eval stage: judge only these of the recipe's eval.judges (the others are left as they are)")
    pipe.add_argument("--verbose", action="store_true", help="stream every stage's full output")
    pipe.add_argument("--dry_run", action="store_true",
                      help="resolve paths, build every stage's command, check it with OpenRLHF's own parser and "
                           "check that the inputs exist; print the plan and run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..logs import setup_logging

    setup_logging("persrm")  # other libraries' warnings print under their own names, not "[persrm]"
    if argv and argv[0] == "synth":
        from data_synth.cli import main as synth_main

        return synth_main(argv[1:])
    if argv and argv[0] == "eval":
        from ..eval.cli import main as eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "serve":
        from ..serve import main as serve_main

        return serve_main(argv[1:])
    args = make_parser().parse_args(argv)
    if args.command == "pipeline":
        from ..pipeline import RecipeError, run_recipe

        try:
            run_recipe(args.recipe, only=args.only, verbose=args.verbose, workdir=args.workdir,
                       corpus=args.input, judges=args.judges, dry_run=args.dry_run)
        except RecipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from ..demo import DemoConfig, run_demo

        try:
            cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k != "command"})
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        run_demo(cfg)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
