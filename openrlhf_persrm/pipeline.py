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
timing and outputs; each stage's full log is in ``<workdir>/logs/``.
"""

from __future__ import annotations

import hashlib
import json
import os
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


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


@dataclass
class EvalSpec:
    """What ``eval`` compares: baselines and the recipe's models, on one split of the pairs."""

    split: str = "test_unseen_authors"
    limit: int = 0
    both_orders: bool = False  # judge each pair twice (real text at A, then at B): position consistency
    judges: list[str] = field(default_factory=lambda: ["random", "stylometry", "base", "sft", "grpo"])
    flags: dict[str, Any] = field(default_factory=dict)  # extra `persrm eval` flags for model judges
    #: Learning curve: every saved SFT/GRPO checkpoint judged on {split, limit} (both orders), e.g.
    #: {"split": "validation", "limit": 40}; None: no curve.
    curve: dict[str, Any] | None = None
    #: Per-judge pair limits that override ``limit``, e.g. {"base": 50} for a slow untrained judge.
    judge_limits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = BASELINE_JUDGES + LIKELIHOOD_JUDGES + MODEL_JUDGES
        bad = [j for j in self.judges if j not in known]
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
    cpu: bool = False
    synth: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] | None = None
    grpo: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    eval: EvalSpec | None = None
    #: How the sft stage is launched: a command prefix ending in its module flag, e.g.
    #: ["deepspeed", "--num_gpus", "8", "--module"] or ["torchrun", "--nproc_per_node", "8", "-m"];
    #: empty: one process (CPU, or a single GPU).
    sft_launch: list[str] = field(default_factory=list)
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
        self.work = Path(recipe.workdir).absolute()
        self.data = self.work / "data"
        self.manifest_path = self.work / "manifest.json"

    # ------------------------------------------------------------------ planning
    def base_model(self) -> str:
        from .models import SMOLLM2, resolve_model

        if self.r.model.lower() in (SMOLLM2, "smollm2"):
            return os.path.abspath(resolve_model(self.r.model))
        return self.r.model

    def plan(self) -> list[Stage]:
        r, py, data = self.r, self.python, self.data
        cpu = ["--cpu"] if r.cpu else []
        cache = ["--persrm.cache_dir", str(self.work / "cache")]
        stages = [Stage("synth", [py, "-m", "data_synth", "--output_dir", str(data), "--seed", str(r.seed),
                                  "--progress", "false"] + _flags(r.synth),
                        [str(data / "manifest.json"), str(data / "pairs.jsonl")], {"synth": r.synth, "seed": r.seed})]
        model = "@base"
        if r.sft is not None:
            launch = list(r.sft_launch) or [py, "-m"]
            argv = [*launch, "openrlhf_persrm.cli.train_sft", *cpu, "--dataset_plugin", "persrm_sft",
                    "--data.dataset", str(data / "sft.jsonl"), "--model.model_name_or_path", model,
                    "--ckpt.output_dir", str(self.work / "sft"), "--ckpt.save_hf", "--train.seed", str(r.seed),
                    "--ckpt.path", str(self.work / "sft_ckpt"), *cache, *_flags(r.sft)]
            stages.append(Stage("sft", argv, [str(self.work / "sft" / "config.json")], {"sft": r.sft}))
            model = str(self.work / "sft")
        if r.grpo is not None:
            actor = r.grpo.get("actor.model_name_or_path", model)
            flags = {k: v for k, v in r.grpo.items() if k != "actor.model_name_or_path"}
            argv = [py, "-m", "openrlhf_persrm.cli.train_ppo_ray", *cpu, "--reward_plugin", "persrm_rule",
                    "--dataset_plugin", "persrm_rl", "--data.prompt_dataset", str(data / "rl.jsonl"),
                    "--actor.model_name_or_path", actor, "--ckpt.output_dir", str(self.work / "grpo"),
                    "--ckpt.save_hf", "--train.seed", str(r.seed), "--ckpt.path", str(self.work / "grpo_ckpt"),
                    *cache, *_flags(flags)]
            stages.append(Stage("grpo", argv, [str(self.work / "grpo" / "config.json")], {"grpo": r.grpo}))
        if r.policy is not None:
            argv = [py, "-m", "openrlhf_persrm.cli.train_ppo_ray", *cpu, "--ckpt.output_dir",
                    str(self.work / "policy"), "--ckpt.save_hf", "--train.seed", str(r.seed), *cache,
                    *_flags(r.policy)]
            stages.append(Stage("policy", argv, [str(self.work / "policy" / "config.json")], {"policy": r.policy}))
        if r.eval is not None:
            stages.append(Stage("eval", [], [str(self.work / "eval" / "compare.md")], {"eval": asdict(r.eval)}))
        return stages

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
                j in self.r.eval.judges for j in ("base",) + LIKELIHOOD_JUDGES))
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
            self._save_manifest(manifest)
            print(f"   {stage.name} done in {time.time() - t0:.0f} s", flush=True)
        manifest["finished"] = time.time()
        self._save_manifest(manifest)
        return manifest

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
                    pieces = [p.strip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
                    if pieces:
                        last["line"] = pieces[-1]
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
        models = {"base": base, "sft": str(self.work / "sft"), "grpo": str(self.work / "grpo")}
        argv = ["--pairs", str(self.data / "pairs.jsonl"), "--out", str(self.work / "eval" / judge),
                "--seed", str(self.r.seed), "--label", {"base": f"untrained ({self.r.model})", "sft": "PersRM SFT",
                                                        "grpo": "PersRM SFT+GRPO"}.get(judge, judge)]
        if spec.split:
            argv += ["--split", spec.split]
        limit = spec.judge_limits.get(judge, spec.limit)
        if limit:
            argv += ["--limit", str(limit)]
        if spec.both_orders:
            argv += ["--both_orders"]
        if judge in MODEL_JUDGES:
            argv += ["--judge", "model", "--model", str(models[judge])] + _flags(spec.flags)
        elif judge in LIKELIHOOD_JUDGES:
            argv += ["--judge", judge, "--model", str(base)]
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


def run_recipe(path: str, *, only: Sequence[str] = (), verbose: bool = False, workdir: str | None = None,
               corpus: str | None = None, judges: Sequence[str] | None = None) -> dict:
    recipe = Recipe.load(path)
    if workdir:
        recipe.workdir = workdir
    if corpus:
        recipe.synth["input"] = os.path.abspath(corpus) if corpus != "demo" else corpus
    return Pipeline(recipe, verbose=verbose, judges=judges).run(only)
