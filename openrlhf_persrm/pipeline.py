"""``persrm pipeline RECIPE``: one YAML recipe per experiment, run stage by stage.

Stages, in order (a recipe may leave any of the training stages out):

``synth``   ``persrm synth`` builds pairs, SFT traces and RL rows from a corpus;
``sft``     stage 1 through ``openrlhf_persrm.cli.train_sft`` (OpenRLHF's ``train_sft``);
``grpo``    stage 2 through ``openrlhf_persrm.cli.train_ppo_ray`` with ``persrm_rule``;
``policy``  downstream policy GRPO with ``--reward_plugin persrm`` (GPU recipes);
``eval``    ``persrm eval`` of the baselines and of every model the recipe names, then a comparison.

Each training stage runs in its own process through the launcher wrappers. A stage whose
outputs are complete and whose configuration (its own and every stage before it) is
unchanged is skipped, so rerunning a recipe after a crash resumes where it stopped. The run
manifest (``<workdir>/manifest.json``) records the recipe, code version, and per-stage status,
timing and outputs, and whether each training stage changed the model's weights (a stage that
left them unchanged learnt nothing, and the pipeline says so); each stage's full log is in
``<workdir>/logs/``.

Relative paths in a recipe (``workdir``, ``synth.input``, datasets, local models, plugin files,
output folders) are resolved against the directory ``persrm pipeline`` runs in, before any
stage starts; ``{workdir}`` in a value stands for the run's workdir. ``persrm pipeline RECIPE
--dry_run`` shows the resolved plan: every stage's command, parsed by OpenRLHF's own parser
(and ``persrm synth``'s), and every input that must exist, without running anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__

STAGES = ("synth", "sft", "grpo", "policy", "eval")
MODEL_JUDGES = ("base", "sft", "grpo")
BASELINE_JUDGES = ("random", "length", "stylometry", "artefact", "evidence")
#: Judges that read the untrained base model's likelihoods (no generation).
LIKELIHOOD_JUDGES = ("fluency", "likelihood")
#: Judges that read the rows' evidence (measured with the base model where a row has none).
READER_JUDGES = ("reader", "oracle")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


@dataclass
class EvalSpec:
    """What ``eval`` compares: baselines and the recipe's models, on one split of the pairs."""

    split: str = "test_unseen_authors"
    limit: int = 0
    limit_per_type: int = 0  # at most this many pairs of each negative type (0: no cap)
    both_orders: bool = False  # judge each pair twice (real text at A, then at B): position consistency
    judges: list[str] = field(default_factory=lambda: ["random", "stylometry", "base", "sft", "grpo"])
    flags: dict[str, Any] = field(default_factory=dict)  # extra `persrm eval` flags for model judges
    #: Learning curve: every saved SFT/GRPO checkpoint judged on {split, limit} (both orders), e.g.
    #: {"split": "validation", "limit": 40}; None: no curve.
    curve: dict[str, Any] | None = None
    #: Per-judge pair limits that override ``limit``, e.g. {"base": 50} for a slow untrained judge.
    judge_limits: dict[str, int] = field(default_factory=dict)
    #: Extra judges: a label -> a judge checkpoint folder (e.g. a shipped adapter), judged like sft/grpo.
    models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = BASELINE_JUDGES + LIKELIHOOD_JUDGES + READER_JUDGES + MODEL_JUDGES + tuple(self.models)
        # "likelihood@grpo": the exemplar gain measured with a trained judge's own likelihoods
        bad = [j for j in self.judges if j not in known
               and not (j.partition("@")[0] in LIKELIHOOD_JUDGES and j.partition("@")[2] in MODEL_JUDGES)]
        if bad:
            raise RecipeError(f"eval.judges: unknown {bad}; choose from {list(known)}")
        unknown = sorted(set(self.judge_limits) - set(self.judges))
        if unknown:
            raise RecipeError(f"eval.judge_limits names {unknown}, which are not in eval.judges")
        if self.curve is not None:
            unknown = sorted(set(self.curve) - {"split", "limit"})
            if unknown or not self.curve.get("split"):
                raise RecipeError(f"eval.curve: expected {{split, limit}} (e.g. {{split: validation, limit: 40}}), "
                                  f"got {self.curve}")


@dataclass
class Recipe:
    """One experiment. Flag dicts map OpenRLHF / ``persrm synth`` flags (without ``--``) to values."""

    name: str
    model: str
    workdir: str = ""
    seed: int = 0
    #: true: every training stage with --cpu; false: with --gpu (fail rather than fall back to CPU);
    #: unset: the wrappers choose (CPU only without a GPU and without a reachable Ray cluster).
    cpu: bool | None = None
    synth: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] | None = None
    grpo: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    eval: EvalSpec | None = None
    #: How the sft stage is launched: a command prefix ending in its module flag, e.g.
    #: ["deepspeed", "--num_gpus", "8", "--module"] or ["torchrun", "--nproc_per_node", "8", "-m"];
    #: empty: one process (CPU, or a single GPU).
    sft_launch: list[str] = field(default_factory=list)
    #: Where to put a copy of the run's report (eval/report.md, with its figures beside it), e.g.
    #: docs/study-x.md; relative to where the command runs. Empty: the report stays in the workdir.
    report: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.workdir:
            self.workdir = os.path.join("runs", self.name)
        if isinstance(self.eval, dict):
            self.eval = EvalSpec(**self.eval)
        if "input" not in self.synth:
            raise RecipeError("synth.input is missing: a corpus JSONL (or 'demo' for the shipped demo corpus)")
        if self.grpo is not None and self.sft is None and "actor.model_name_or_path" not in self.grpo:
            raise RecipeError("grpo without sft: set grpo['actor.model_name_or_path'] to the model to train")
        if self.eval is not None:
            for judge in self.eval.judges:
                judge = judge.partition("@")[2] or judge
                if judge in ("sft", "grpo") and getattr(self, judge) is None:
                    raise RecipeError(f"eval.judges names {judge!r} but the recipe has no {judge} stage")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RecipeError(f"{path}: {exc}") from None


#: Flag names (or endings) whose values are files or folders the stage reads.
INPUT_KEYS = ("input", "dataset", "prompt_dataset", "model_name_or_path", "pretrain", "load_path",
              "agent_func_path", "wordnet_dir", "gguf_file", "hostfile")
#: Flag endings whose values are folders or files a stage writes.
OUTPUT_ENDINGS = ("_dir", "output_dir", "save_path", "ckpt.path")
PLUGIN_KEYS = ("dataset_plugin", "reward_plugin")
_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv", ".arrow", ".txt", ".py", ".yaml", ".yml")


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _local(value: str, base: Path) -> bool:
    """Whether ``value`` names a local path rather than a hub id (``Qwen/Qwen2.5-7B-Instruct``)."""
    return (value.startswith((".", "/", "~")) or value.endswith(_FILE_SUFFIXES)
            or (base / os.path.expanduser(value)).exists())


def _absolute(value: str, base: Path) -> str:
    return str((base / os.path.expanduser(value)).resolve()) if not os.path.isabs(value) else value


def resolve_paths(flags: dict[str, Any] | None, base: Path, workdir: Path) -> dict[str, Any]:
    """``flags`` with every path made absolute against ``base`` (where the command runs)."""
    out: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if isinstance(value, str):
            value = value.replace("{workdir}", str(workdir))
            leaf = _leaf(key)
            if key in PLUGIN_KEYS:  # a file plugin (file.py[:Class]); names and dotted paths stay
                path, sep, attr = value.partition(":") if value.count(":") == 1 else (value, "", "")
                if path.endswith(".py") or (base / path).is_file():
                    value = _absolute(path, base) + sep + attr
            elif key.endswith("_config") and value.startswith("@"):
                value = "@" + _absolute(value[1:], base)
            elif key.endswith(OUTPUT_ENDINGS) or key == "ckpt.path":
                value = _absolute(value, base)
            elif leaf in INPUT_KEYS or key in INPUT_KEYS:
                parts = [p.strip() for p in value.split(",")]
                value = ",".join(_absolute(p, base) if p != "demo" and _local(p, base) else p for p in parts)
        out[key] = value
    return out


def _flags(d: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    for key, value in (d or {}).items():
        if value is False or value is None:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    return out


def _weights_digest(folder: Path) -> str:
    """A content hash of a checkpoint folder's weight files."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    argv: list[str]              # a subprocess command, or [] for in-process eval
    outputs: list[str]           # files that must exist for the stage to count as complete
    config: dict[str, Any]
    launcher: str = ""           # "synth", "train_sft" or "train_ppo_ray": whose parser checks argv
    inputs: dict[str, str] = field(default_factory=dict)  # what the stage reads -> path or model id
    weights: tuple[str, str] | None = None  # (model in, checkpoint out) of a training stage


class Pipeline:
    """Plans and runs a recipe's stages; see the module docstring."""

    def __init__(self, recipe: Recipe, *, python: str = sys.executable, verbose: bool = False,
                 judges: Sequence[str] | None = None):
        self.r = recipe
        self.judges = list(judges) if judges is not None else None
        if self.judges is not None and recipe.eval is not None:
            unknown = [j for j in self.judges if j not in recipe.eval.judges + ["curve"]]
            if unknown:
                raise RecipeError(f"--judges {unknown}: not in the recipe's eval.judges {recipe.eval.judges} "
                                  "(or 'curve')")
        self.python = python
        self.verbose = verbose
        #: Relative paths in the recipe are resolved against where the command runs.
        self.base = Path.cwd()
        self.work = Path(os.path.expanduser(recipe.workdir))
        self.work = self.work if self.work.is_absolute() else (self.base / self.work).resolve()
        self.data = self.work / "data"
        self.manifest_path = self.work / "manifest.json"

    # ------------------------------------------------------------------ planning
    def base_model(self) -> str:
        from .models import SMOLLM2, resolve_model

        if self.r.model.lower() in (SMOLLM2, "smollm2"):
            return os.path.abspath(resolve_model(self.r.model))
        return self.model_id()

    def model_id(self) -> str:
        """The base model as the stages get it (a local path made absolute), without converting SmolLM2."""
        from .models import SMOLLM2

        if self.r.model.lower() in (SMOLLM2, "smollm2"):
            return self.r.model
        return _absolute(self.r.model, self.base) if _local(self.r.model, self.base) else self.r.model

    def _resolve(self, flags: dict[str, Any] | None) -> dict[str, Any]:
        return resolve_paths(flags, self.base, self.work)

    @property
    def lora(self) -> bool:
        """Whether stage 1 trains a LoRA adapter (``ds.lora.rank`` > 0): its folder then holds the adapter,
        and ``<folder>/merged`` the full model the later stages and the judges use."""
        return int((self.r.sft or {}).get("ds.lora.rank", 0) or 0) > 0

    def trained(self, stage: str) -> str:
        """The full model a training stage leaves (the merged adapter for a LoRA stage 1)."""
        folder = self.work / stage
        return str(folder / "merged") if stage == "sft" and self.lora else str(folder)

    def evidence_scorer(self) -> str | None:
        """The scorer the synth stage measures evidence with (None: the data has no evidence)."""
        synth = self.r.synth
        return synth.get("evidence.scorer") or synth.get("evidence.served_model") or None

    def card(self) -> dict[str, Any] | None:
        """The judge card of this run's trained judges: evidence-informed when the data carries evidence."""
        scorer = self.evidence_scorer()
        if scorer is None:
            return None
        from .evidence.measures import EVIDENCE_VERSION

        return {"evidence": {"version": EVIDENCE_VERSION, "scorer": scorer}, "recipe": self.r.name,
                "base_model": self.r.model, "version": __version__}

    def write_cards(self, stage: str) -> None:
        """Put the judge card into a training stage's model and every checkpoint it saved (before any merge)."""
        from .models import write_judge_card

        card = self.card()
        if card is None:
            return
        folders = [self.work / stage] + sorted((self.work / f"{stage}_ckpt").glob("global_step*_hf"))
        for folder in folders:
            if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
                write_judge_card(folder, card)

    def plan(self) -> list[Stage]:
        r, py, data = self.r, self.python, self.data
        mode = {True: ["--cpu"], False: ["--gpu"]}.get(r.cpu, [])
        cache = ["--persrm.cache_dir", str(self.work / "cache")]
        synth = self._resolve(r.synth)
        stages = [Stage("synth", [py, "-m", "data_synth", "--output_dir", str(data), "--seed", str(r.seed),
                                  "--progress", "true"] + _flags(synth),
                        [str(data / "manifest.json"), str(data / "pairs.jsonl")], {"synth": synth, "seed": r.seed},
                        launcher="synth", inputs={"synth.input": synth["input"]})]
        model = "@base"
        if r.sft is not None:
            sft = self._resolve(r.sft)
            launch = list(r.sft_launch) or [py, "-m"]
            argv = [*launch, "openrlhf_persrm.cli.train_sft", *mode, "--dataset_plugin", "persrm_sft",
                    "--data.dataset", str(data / "sft.jsonl"), "--model.model_name_or_path", model,
                    "--ckpt.output_dir", str(self.work / "sft"), "--ckpt.save_hf", "--train.seed", str(r.seed),
                    "--ckpt.path", str(self.work / "sft_ckpt"), *cache, *_flags(sft)]
            stages.append(Stage("sft", argv, [str(self.work / "sft" / "config.json")], {"sft": sft},
                                launcher="train_sft", inputs={"data.dataset": str(data / "sft.jsonl"),
                                                              "model.model_name_or_path": model},
                                weights=(model, self.trained("sft"))))
            model = self.trained("sft")
        if r.grpo is not None:
            grpo = self._resolve(r.grpo)
            actor = grpo.get("actor.model_name_or_path", model)
            flags = {k: v for k, v in grpo.items() if k != "actor.model_name_or_path"}
            argv = [py, "-m", "openrlhf_persrm.cli.train_ppo_ray", *mode, "--reward_plugin", "persrm_rule",
                    "--dataset_plugin", "persrm_rl", "--data.prompt_dataset", str(data / "rl.jsonl"),
                    "--actor.model_name_or_path", actor, "--ckpt.output_dir", str(self.work / "grpo"),
                    "--ckpt.save_hf", "--train.seed", str(r.seed), "--ckpt.path", str(self.work / "grpo_ckpt"),
                    *cache, *_flags(flags)]
            stages.append(Stage("grpo", argv, [str(self.work / "grpo" / "config.json")], {"grpo": grpo},
                                launcher="train_ppo_ray",
                                inputs={"data.prompt_dataset": str(data / "rl.jsonl"),
                                        "actor.model_name_or_path": actor},
                                weights=(actor, str(self.work / "grpo"))))
        if r.policy is not None:
            # By default the policy trains on this run's RL prompts, as persrm_policy rows.
            policy = self._resolve({"dataset_plugin": "persrm_policy", "data.prompt_dataset": str(data / "rl.jsonl"),
                                    **r.policy})
            argv = [py, "-m", "openrlhf_persrm.cli.train_ppo_ray", *mode, "--ckpt.output_dir",
                    str(self.work / "policy"), "--ckpt.save_hf", "--train.seed", str(r.seed), *cache,
                    *_flags(policy)]
            actor = policy.get("actor.model_name_or_path", "")
            inputs = {k: v for k, v in policy.items() if isinstance(v, str)
                      and (k in PLUGIN_KEYS or _leaf(k) in INPUT_KEYS)}
            stages.append(Stage("policy", argv, [str(self.work / "policy" / "config.json")], {"policy": policy},
                                launcher="train_ppo_ray", inputs=inputs,
                                weights=(actor, str(self.work / "policy")) if actor else None))
        if r.eval is not None:
            stages.append(Stage("eval", [], [str(self.work / "eval" / "compare.md")], {"eval": asdict(r.eval)},
                                inputs={"pairs": str(data / "pairs.jsonl")}))
        return stages

    # ------------------------------------------------------------------ dry run
    def _made_by(self, path: str, stages: list[Stage], upto: int) -> str | None:
        """The earlier stage that writes ``path``, if any."""
        for stage in stages[:upto]:
            root = {"synth": self.data}.get(stage.name, self.work / stage.name)
            if path == str(root) or path.startswith(str(root) + os.sep):
                return stage.name
        return None

    def check_stage(self, stage: Stage, stages: list[Stage], index: int) -> tuple[list[str], list[str]]:
        """``(notes, problems)`` for one stage: its argv through the real parser, its inputs."""
        notes, problems = [], []
        if stage.launcher:
            problems += self._parse(stage)
        if stage.name == "eval":
            problems += self._parse_eval()
        from .models import SMOLLM2

        for flag, value in stage.inputs.items():
            if value == "@base":
                value = self.model_id()
                if value.lower() in (SMOLLM2, "smollm2"):
                    notes.append(f"{flag}: {value} (built in; converted to a checkpoint on the first run)")
                    continue
            for part in str(value).split(","):
                maker = self._made_by(part, stages, index)
                if maker:
                    notes.append(f"{flag}: {part} (made by {maker})")
                elif part == "demo" and flag == "synth.input":
                    notes.append(f"{flag}: the shipped demo corpus")
                elif os.path.exists(part.split(":")[0] if flag in PLUGIN_KEYS else part):
                    notes.append(f"{flag}: {part} (exists)")
                elif flag in PLUGIN_KEYS and not os.path.isabs(part):
                    notes.append(f"{flag}: {part} (a registered plugin or module)")
                elif os.path.isabs(part) or _local(part, self.base):
                    problems.append(f"{stage.name}: {flag} {part} does not exist (relative paths in a recipe are "
                                    f"resolved against {self.base}, where the command runs)")
                else:
                    notes.append(f"{flag}: {part} (not a local path: a model id, loaded by the stage)")
        return notes, problems

    def _parse(self, stage: Stage) -> list[str]:
        """Run ``stage.argv`` through the parser of what it launches; the parser's complaints."""
        argv = [self.model_id() if a == "@base" else a for a in stage.argv]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                if stage.launcher == "synth":
                    from data_synth.cli import config_from_args, make_parser

                    config_from_args(make_parser().parse_args(argv[argv.index("data_synth") + 1:]))
                    return []
                from . import compat
                from .cli._wrapper import load_json_config, namespace_dict, plugin_parser
                from .registry import dataset_plugins, instantiate, reward_plugins

                module = f"openrlhf_persrm.cli.{stage.launcher}"
                tokens = argv[argv.index(module) + 1:]
                ours, rest = plugin_parser(stage.launcher, reward=stage.launcher == "train_ppo_ray") \
                    .parse_known_args(tokens)
                namespace_dict(compat.launcher_parser(stage.launcher), rest)  # OpenRLHF's own parser
                if ours.dataset_plugin:
                    instantiate(dataset_plugins, ours.dataset_plugin,
                                load_json_config(ours.dataset_plugin_config, "--dataset_plugin_config"))
                if getattr(ours, "reward_plugin", None):
                    instantiate(reward_plugins, ours.reward_plugin,
                                load_json_config(ours.reward_plugin_config, "--reward_plugin_config"))
        except SystemExit:
            return [f"{stage.name}: {stage.launcher}'s parser refused the stage's flags: "
                    f"{err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else '(no message)'}"]
        except (ValueError, LookupError, ImportError) as exc:
            return [f"{stage.name}: {exc}"]
        return []

    def _parse_eval(self) -> list[str]:
        from .eval.cli import make_parser

        problems = []
        for judge in self.r.eval.judges:  # type: ignore[union-attr]
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    make_parser().parse_args(self.eval_argv(judge, self.model_id()))
            except SystemExit:
                lines = err.getvalue().strip().splitlines()
                problems.append(f"eval ({judge}): persrm eval's parser refused the flags: "
                                f"{lines[-1] if lines else '(no message)'}")
        return problems

    def dry_run(self, only: Sequence[str] = (), out: Any = None) -> list[dict[str, Any]]:
        """Print the resolved plan; raise :class:`RecipeError` listing every problem found."""
        out = out or sys.stdout
        stages = self.plan()
        plan, problems = [], []
        print(f"persrm pipeline {self.r.name}: dry run (paths resolved against {self.base})", file=out)
        print(f"workdir: {self.work}", file=out)
        for i, stage in enumerate(stages, 1):
            selected = not only or stage.name in only
            notes, found = self.check_stage(stage, stages, i - 1) if selected else ([], [])
            problems += found
            argv = [self.model_id() if a == "@base" else a for a in stage.argv]
            print(f"\n== [{i}/{len(stages)}] {stage.name}" + ("" if selected else " (not selected)"), file=out)
            if argv:
                print("   " + shlex.join(argv), file=out)
            elif stage.name == "eval":
                for judge in self.r.eval.judges:  # type: ignore[union-attr]
                    print("   persrm eval " + shlex.join(self.eval_argv(judge, self.model_id())), file=out)
            for note in notes:
                print(f"   reads  {note}", file=out)
            for path in stage.outputs:
                print(f"   writes {path}", file=out)
            for problem in found:
                print(f"   !! {problem}", file=out)
            plan.append({"name": stage.name, "argv": argv, "inputs": stage.inputs, "outputs": stage.outputs,
                         "problems": found, "selected": selected})
        if problems:
            raise RecipeError("the recipe cannot run as written:\n  " + "\n  ".join(problems))
        print("\nplan OK: every stage's flags parse and every input exists or is made by an earlier stage", file=out)
        return plan

    # ------------------------------------------------------------------ running
    def run(self, only: Sequence[str] = ()) -> dict[str, Any]:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        manifest = self._load_manifest()
        stages = self.plan()
        base = None
        chain = _digest({"model": self.r.model, "version": __version__})
        for i, stage in enumerate(stages, 1):
            chain = _digest([chain, stage.config])
            entry = manifest["stages"].get(stage.name, {})
            done = (entry.get("status") == "done" and entry.get("config_hash") == chain
                    and all(os.path.exists(p) for p in stage.outputs))
            if (only and stage.name not in only) or done:
                print(f"== [{i}/{len(stages)}] {stage.name}: " + ("complete, skipped" if done else "not selected"),
                      flush=True)
                continue
            needs_base = "@base" in stage.argv or (stage.name == "eval" and any(
                j in self.r.eval.judges for j in ("base",) + LIKELIHOOD_JUDGES + READER_JUDGES))
            if needs_base and base is None:
                base = self.base_model()
            argv = [base if a == "@base" else a for a in stage.argv]
            print(f"== [{i}/{len(stages)}] {stage.name}: running (log: {self.work / 'logs' / (stage.name + '.log')})",
                  flush=True)
            t0 = time.time()
            manifest["stages"][stage.name] = {"status": "running", "config_hash": chain, "started": t0}
            self._save_manifest(manifest)
            try:
                if stage.name == "eval":
                    self._run_eval(base)
                else:
                    self._run_process(stage.name, argv)
                missing = [p for p in stage.outputs if not os.path.exists(p)]
                if missing:
                    raise RuntimeError(f"stage {stage.name} finished but did not write {missing}")
            except BaseException as exc:
                manifest["stages"][stage.name].update(status="failed", error=str(exc)[-2000:],
                                                      seconds=round(time.time() - t0, 1))
                self._save_manifest(manifest)
                raise
            partial = stage.name == "eval" and self.judges is not None and not set(
                self.r.eval.judges + ["curve"]) <= set(self.judges)
            manifest["stages"][stage.name].update(status="partial" if partial else "done",
                                                  seconds=round(time.time() - t0, 1), outputs=stage.outputs,
                                                  argv=argv, **({"judges": self.judges} if partial else {}))
            print(f"   {stage.name} done in {time.time() - t0:.0f} s", flush=True)
            if stage.name in ("sft", "grpo"):
                self.write_cards(stage.name)
                if stage.name == "sft" and self.lora:
                    from .models import merged_adapter

                    merged_adapter(self.work / "sft", out=self.trained("sft"))
            if stage.weights is not None:
                self._check_weights(stage, manifest["stages"][stage.name], base)
            self._save_manifest(manifest)
        manifest["finished"] = time.time()
        self._save_manifest(manifest)
        return manifest

    def _check_weights(self, stage: Stage, entry: dict[str, Any], base: str | None) -> None:
        """Record whether a training stage changed the weights; say so loudly when it did not."""
        before, after = stage.weights  # type: ignore[misc]
        before = (base or self.model_id()) if before == "@base" else before
        try:
            changed = weights_changed(before, after)
        except Exception as exc:  # never fail a finished stage over the check itself
            changed, entry["weights_check_error"] = None, f"{type(exc).__name__}: {exc}"
        entry["weights_changed"] = changed
        if changed is False:
            entry["warning"] = (f"the weights in {after} are identical to its input {before}: this stage learnt "
                                "nothing")
            print(f"!! WARNING: stage {stage.name} left the weights unchanged: {after} is identical to its input "
                  f"{before}. Look in {self.work / 'logs' / (stage.name + '.log')} for dropped rows, truncated "
                  "rollouts, rewards without spread (zero gradient) or too few steps.", flush=True)
        elif changed is None:
            print(f"   {stage.name}: could not compare the weights with {before} (not a local checkpoint)", flush=True)
        else:
            print(f"   {stage.name}: weights changed", flush=True)

    def _run_process(self, name: str, argv: list[str]) -> None:
        log_path = self.work / "logs" / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(" ".join(argv) + "\n\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(self.work),
                                    env=env)
            last = {"line": "", "t": time.time()}
            stop = threading.Event()

            def heartbeat() -> None:
                t0 = time.time()
                while not stop.wait(15):
                    print(f"   {name}: {time.time() - t0:4.0f} s  {last['line'][:110]}", flush=True)

            beat = threading.Thread(target=heartbeat, daemon=True)
            if not self.verbose:
                beat.start()
            try:
                # Raw chunks, not lines: progress bars redraw with "\r" and no newline.
                fd = proc.stdout.fileno()  # type: ignore[union-attr]
                while chunk := os.read(fd, 65536):
                    text = chunk.decode("utf-8", errors="replace")
                    log.write(text)
                    log.flush()  # the log on disk is current: a crash or a look at it mid-run sees the last lines
                    line = progress_line(text)
                    if line:
                        last["line"] = line
                    if self.verbose:
                        print(text, end="", flush=True)
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                stop.set()
        if rc != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"stage {name} failed (exit {rc}); last lines of {log_path}:\n{tail}")

    def eval_argv(self, judge: str, base: str | None) -> list[str]:
        """The ``persrm eval`` command line of one of the recipe's judges."""
        spec = self.r.eval
        assert spec is not None
        models = {"base": base, "sft": self.trained("sft"), "grpo": self.trained("grpo"),
                  **{k: _absolute(v, self.base) if _local(v, self.base) else v for k, v in spec.models.items()}}
        argv = ["--pairs", str(self.data / "pairs.jsonl"), "--out", str(self.work / "eval" / judge),
                "--seed", str(self.r.seed), "--label", {"base": f"untrained ({self.r.model})", "sft": "PersRM SFT",
                                                        "grpo": "PersRM SFT+GRPO"}.get(judge, judge)]
        from .models import evidence_scorer_of

        if judge in spec.models:  # e.g. the shipped judge: named by its folder
            argv[-1] = f"{judge} ({Path(models[judge]).name})"
        if (self.evidence_scorer() and judge in ("base", "sft", "grpo")) or (
                judge in spec.models and evidence_scorer_of(models[judge])):
            argv[-1] += " + evidence"
        if spec.split:
            argv += ["--split", spec.split]
        limit = spec.judge_limits.get(judge, spec.limit)
        if limit:
            argv += ["--limit", str(limit)]
        if spec.limit_per_type:
            argv += ["--limit_per_type", str(spec.limit_per_type)]
        if spec.both_orders:
            argv += ["--both_orders"]
        if judge in MODEL_JUDGES or judge in spec.models:
            argv += ["--judge", "model", "--model", str(models[judge])] + _flags(spec.flags)
            if judge == "base" and self.evidence_scorer():
                # the untrained model, shown the same evidence the trained judges read
                argv += ["--evidence", "on", "--scorer", str(base)]
        elif judge.partition("@")[0] in LIKELIHOOD_JUDGES:
            name, _, scorer = judge.partition("@")
            argv += ["--judge", name, "--model", str(models[scorer] if scorer else base)]
            if scorer:
                argv[argv.index("--label") + 1] = f"{name} (the {scorer} judge's own likelihoods)"
        elif judge in READER_JUDGES:
            argv += ["--judge", judge, "--scorer", str(base)]
        else:
            argv += ["--judge", judge]
        return argv

    def _run_eval(self, base: str | None) -> None:
        from .eval.cli import main as eval_main
        from .eval.report import compare

        spec = self.r.eval
        assert spec is not None
        out = self.work / "eval"
        metrics = []
        selected = self.judges if self.judges is not None else spec.judges + ["curve"]
        for judge in spec.judges:
            run_dir = out / judge
            if judge not in selected:
                if (run_dir / "metrics.json").exists():
                    metrics.append(str(run_dir / "metrics.json"))
                continue
            argv = self.eval_argv(judge, base)
            metrics.append(str(run_dir / "metrics.json"))
            # A judge already evaluated with the same command is not judged again (resume after a crash;
            # `persrm eval` writes metrics.json last, atomically).
            stamp = run_dir / "argv.json"
            if (run_dir / "metrics.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == argv:
                print(f"   eval: {judge} (complete, skipped)", flush=True)
                continue
            print(f"   eval: {judge}", flush=True)
            rc = eval_main(argv)
            if rc != 0:
                raise RuntimeError(f"persrm eval {judge} failed (exit {rc})")
            stamp.write_text(json.dumps(argv))
        if spec.curve and "curve" in selected:
            self._run_curve(spec, out / "curve")
        table = compare(metrics, str(out / "compare.png"), str(out / "compare.md"))
        print(table, flush=True)
        from .report import write_report

        write_report(self, metrics, copy_to=_absolute(self.r.report, self.base) if self.r.report else None)

    def checkpoints(self) -> list[tuple[str, int, str]]:
        """``(stage, step, path)`` of every saved HF checkpoint, SFT then GRPO, in step order."""
        import re

        found: list[tuple[str, int, str]] = []
        for stage in ("sft", "grpo"):
            root = self.work / f"{stage}_ckpt"
            steps = []
            for p in root.glob("global_step*_hf") if root.exists() else []:
                m = re.fullmatch(r"global_step(\d+)_hf", p.name)
                if m and (p / "config.json").exists():
                    steps.append((int(m.group(1)), str(p)))
            steps.sort()
            found += [(stage, step, path) for step, path in steps]
            final = self.work / stage
            # The final model, unless it is the last checkpoint (same weights file).
            if (final / "config.json").exists() and (not steps or _weights_digest(final) != _weights_digest(
                    Path(steps[-1][1]))):
                found.append((stage, -1, str(final)))
        return found

    def _run_curve(self, spec: EvalSpec, out: Path) -> None:
        """The learning curve: every checkpoint judged on ``spec.curve``'s split (both orders)."""
        from .eval.cli import main as eval_main
        from .eval.report import plot_curve

        assert spec.curve is not None
        points = []
        for stage, step, path in self.checkpoints():
            run_dir = out / f"{stage}_{step}"
            if not (run_dir / "metrics.json").exists():
                argv = ["--pairs", str(self.data / "pairs.jsonl"), "--out", str(run_dir), "--seed", str(self.r.seed),
                        "--split", spec.curve["split"], "--both_orders", "--judge", "model", "--model", path,
                        "--label", f"{stage} step {step}"] + _flags(spec.flags)
                if spec.curve.get("limit"):
                    argv += ["--limit", str(spec.curve["limit"])]
                print(f"   eval curve: {stage} step {step}", flush=True)
                if eval_main(argv) != 0:
                    raise RuntimeError(f"persrm eval of {path} failed")
            m = json.loads((run_dir / "metrics.json").read_text())
            points.append({"stage": stage, "step": step, "path": path, "accuracy": m["overall"]["accuracy"],
                           "ci95": m["overall"].get("ci95"), "consistency": m.get("consistency"),
                           "format_failure_rate": m.get("format_failure_rate")})
        (out / "curve.json").write_text(json.dumps(points, indent=2))
        if points:
            plot_curve(points, str(out / "learning_curve.png"), split=spec.curve["split"])

    # ------------------------------------------------------------------ manifest
    def _load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            manifest = json.loads(self.manifest_path.read_text())
        else:
            manifest = {"stages": {}}
        manifest.update(recipe=asdict(self.r), version=__version__, python=sys.version.split()[0],
                        started=manifest.get("started", time.time()))
        return manifest

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, self.manifest_path)


_NOISE = ("warning", "warn(", "deprecat", "import pynvml", "futurewarning", "userwarning", "notice", "ignoring ",
          "setting accelerator", "loading weights", "writing model shards", "converting and de-quantizing",
          "ld returned", "cannot find -l", "collect2", "traceback", "type: ignore")


def progress_line(text: str) -> str | None:
    """The line of a stage's output worth showing as its progress: the last progress bar or step/metric line
    (tqdm bars, OpenRLHF's per-step logs, judgments done), never another library's warning or notice; None
    when the chunk has nothing of the kind."""
    pieces = [p.strip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
    useful = [p for p in pieces if not any(n in p.lower() for n in _NOISE)]
    bars = [p for p in useful if "%|" in p or "it/s" in p or "s/it" in p or "step" in p.lower()
            or "reward" in p.lower() or "loss" in p.lower()]
    return (bars or useful or [None])[-1]


def _safetensors(folder: str) -> dict[str, str]:
    """Tensor name -> file, over a checkpoint folder's safetensors files."""
    from safetensors import safe_open

    index: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            with safe_open(path, framework="pt") as fh:
                for key in fh.keys():
                    index[key] = path
    return index


def _local_checkpoint(model: str) -> str | None:
    if os.path.isdir(model):
        return model
    try:  # a hub id already in the local Hugging Face cache; nothing is downloaded
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    except Exception:
        return None


def weights_changed(before: str, after: str) -> bool | None:
    """Whether checkpoint ``after`` differs from model ``before`` (None: cannot tell).

    Tensors are compared one at a time (a 7B model is never held twice in memory), ``before``
    cast to ``after``'s dtype first: a stage that trains in bf16 from an fp32 model and changes
    nothing saves exactly the cast weights. Stops at the first difference.
    """
    import torch
    from safetensors import safe_open

    folder = _local_checkpoint(before)
    if folder is None or not os.path.isdir(after):
        return None
    old, new = _safetensors(folder), _safetensors(after)
    common = sorted(set(old) & set(new))
    if not common:
        return None
    handles: dict[str, Any] = {}
    try:
        def tensor(index: dict[str, str], key: str) -> torch.Tensor:
            path = index[key]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt").__enter__()
            return handles[path].get_tensor(key)

        for key in common:
            a, b = tensor(new, key), tensor(old, key)
            if a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
                return True
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return False


def run_recipe(path: str, *, only: Sequence[str] = (), verbose: bool = False, workdir: str | None = None,
               corpus: str | None = None, judges: Sequence[str] | None = None, dry_run: bool = False) -> Any:
    recipe = Recipe.load(path)
    if workdir:
        recipe.workdir = workdir
    if corpus:
        recipe.synth["input"] = os.path.abspath(corpus) if corpus != "demo" else corpus
    pipeline = Pipeline(recipe, verbose=verbose, judges=judges)
    pipeline.recipe_path = os.path.relpath(path) if not os.path.isabs(path) else path
    if dry_run:
        return pipeline.dry_run(only)
    return pipeline.run(only)
