"""persrm pipeline: recipes validate, stages run in order, complete stages are skipped."""

import json

import pytest
import yaml

from openrlhf_persrm.pipeline import Pipeline, Recipe, RecipeError


def _recipe(tmp_path, **overrides):
    data = {"name": "t", "model": "unused-model", "workdir": str(tmp_path / "run"),
            "synth": {"input": "demo", "teacher.backend": "offline", "split.unseen_authors": 3,
                      "pairs.negative_types": "minor_replacement,cross_author"},
            "eval": {"split": "test_unseen_authors", "limit": 20, "judges": ["random", "stylometry"]}}
    data.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_synth_and_baseline_eval_then_skip_then_rerun_changed_stage(tmp_path, capsys):
    recipe = Recipe.load(_recipe(tmp_path))
    manifest = Pipeline(recipe).run()
    assert [manifest["stages"][s]["status"] for s in ("synth", "eval")] == ["done", "done"]
    run = tmp_path / "run"
    metrics = json.loads((run / "eval" / "stylometry" / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 20
    assert "stylometry" in (run / "eval" / "compare.md").read_text()
    assert (run / "eval" / "compare.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    Pipeline(Recipe.load(_recipe(tmp_path))).run()
    out = capsys.readouterr().out
    assert "synth: complete, skipped" in out and "eval: complete, skipped" in out

    changed = _recipe(tmp_path, eval={"split": "test_unseen_authors", "limit": 10, "judges": ["random"]})
    Pipeline(Recipe.load(changed)).run()
    out = capsys.readouterr().out
    assert "synth: complete, skipped" in out and "eval: running" in out
    assert json.loads((tmp_path / "run" / "eval" / "random" / "metrics.json").read_text())["overall"]["n"] == 10


def test_judges_option_adds_one_judge_and_leaves_the_stage_unfinished(tmp_path, capsys):
    both = _recipe(tmp_path)
    manifest = Pipeline(Recipe.load(both), judges=["random"]).run()
    assert manifest["stages"]["eval"]["status"] == "partial"
    run = tmp_path / "run"
    assert (run / "eval" / "random" / "metrics.json").exists()
    assert not (run / "eval" / "stylometry").exists()
    capsys.readouterr()
    manifest = Pipeline(Recipe.load(both)).run()       # the rest, random not judged again
    out = capsys.readouterr().out
    assert manifest["stages"]["eval"]["status"] == "done"
    assert "eval: random (complete, skipped)" in out and "eval: stylometry" in out
    with pytest.raises(RecipeError, match="--judges"):
        Pipeline(Recipe.load(both), judges=["grpo"])


@pytest.mark.parametrize("overrides,match", [
    ({"synth": {}}, "synth.input is missing"),
    ({"eval": {"judges": ["psychic"]}}, "unknown \\['psychic'\\]"),
    ({"eval": {"judges": ["sft"]}}, "no sft stage"),
    ({"grpo": {"vllm.num_engines": 1}}, "grpo without sft"),
    ({"typo_key": 1}, "unknown keys \\['typo_key'\\]"),
])
def test_bad_recipes_name_the_key(tmp_path, overrides, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.load(_recipe(tmp_path, **overrides))


def test_shipped_recipes_are_valid_and_plan_the_wrappers():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.glob("recipes/*.yaml")):
        recipe = Recipe.load(path)
        stages = Pipeline(recipe).plan()
        names = [s.name for s in stages]
        assert names[0] == "synth" and names[-1] == "eval", path
        for stage in stages:
            if stage.name == "sft":
                assert "openrlhf_persrm.cli.train_sft" in stage.argv and "persrm_sft" in stage.argv
            if stage.name == "grpo":
                assert "openrlhf_persrm.cli.train_ppo_ray" in stage.argv and "persrm_rule" in stage.argv


# ------------------------------------------------------------------ paths and --dry_run

RECIPES = sorted((__import__("pathlib").Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _corpus(folder, n=None):
    """The shipped demo corpus as a gzip JSONL file (optionally its first ``n`` lines)."""
    import gzip
    from pathlib import Path

    import openrlhf_persrm

    lines = (Path(openrlhf_persrm.__file__).parent / "data" / "demo_corpus.jsonl").read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines[:n]) + "\n")
    return path


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_dry_run_every_shipped_recipe(recipe_path, tmp_path, monkeypatch):
    """Paths resolve against where the command runs; every stage's argv parses with OpenRLHF's own
    parser; inputs that must exist are checked."""
    import io

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = Recipe.load(recipe_path)
    needs_corpus = recipe.synth["input"] != "demo"
    corpus = (cwd / recipe.synth["input"]).resolve()
    if needs_corpus:
        with pytest.raises(RecipeError, match=f"synth.input {corpus} does not exist"):
            Pipeline(recipe).dry_run(out=io.StringIO())
        _corpus(corpus.parent, 5).rename(corpus)
    out = io.StringIO()
    plan = {s["name"]: s for s in Pipeline(recipe).dry_run(out=out)}
    text = out.getvalue()
    assert "plan OK" in text
    work = cwd / "runs" / recipe.name
    assert f"workdir: {work}" in text
    synth = plan["synth"]["argv"]
    assert synth[synth.index("--input") + 1] == ("demo" if not needs_corpus else str(corpus))
    for stage in plan.values():
        argv = stage["argv"]
        for flag in ("--data.dataset", "--data.prompt_dataset", "--ckpt.output_dir", "--persrm.cache_dir"):
            if flag in argv:
                value = argv[argv.index(flag) + 1]
                assert value.startswith(str(work) + "/") and "runs/" + recipe.name + "/runs" not in value, value
    if "policy" in plan:
        argv = plan["policy"]["argv"]
        assert argv[argv.index("--data.prompt_dataset") + 1] == str(work / "data" / "rl.jsonl")
        assert "--gpu" in argv and "--gpu" in plan["grpo"]["argv"]
    if recipe.cpu:
        assert "--cpu" in plan["sft"]["argv"] and "--cpu" in plan["grpo"]["argv"]


@pytest.mark.parametrize("overrides,match", [
    ({"grpo": {"actor.model_name_or_path": "x", "rollout.no_such_flag": 1}},
     "train_ppo_ray's parser refused the stage's flags: .*unrecognized arguments: --rollout.no_such_flag"),
    ({"sft": {"train.max_epochs": "two"}}, "train_sft's parser refused .*invalid int value: 'two'"),
    ({"grpo": {"actor.model_name_or_path": "./no-such-model"}}, "actor.model_name_or_path .*/no-such-model does not exist"),
    ({"policy": {"reward_plugin": "my_reward.py:R", "actor.model_name_or_path": "m"}}, "my_reward.py"),
    ({"synth": {"input": "demo", "pairs.no_such": 1}}, "synth's parser refused"),
    ({"eval": {"judges": ["random", "base"], "flags": {"no_such": 1}}},
     r"eval \(base\): persrm eval's parser refused the flags: .*--no_such"),
    ({}, ""),
])
def test_dry_run_finds_what_would_fail(tmp_path, monkeypatch, overrides, match):
    import io

    monkeypatch.chdir(tmp_path)
    recipe = Recipe.load(_recipe(tmp_path, **overrides))
    if not match:  # a valid recipe: nothing to complain about
        Pipeline(recipe).dry_run(out=io.StringIO())
        return
    with pytest.raises(RecipeError, match=match):
        Pipeline(recipe).dry_run(out=io.StringIO())


def test_relative_paths_resolve_against_where_the_command_runs(tmp_path, monkeypatch, capsys):
    """A recipe elsewhere, a relative corpus and workdir: the synth stage (run with cwd=workdir)
    still finds the corpus, through the CLI."""
    from openrlhf_persrm.cli.main import main

    project = tmp_path / "project"
    _corpus(project / "data", 120)
    (tmp_path / "elsewhere").mkdir()
    recipe = tmp_path / "elsewhere" / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "rel", "model": "unused", "workdir": "runs/rel", "synth": {
        "input": "data/corpus.jsonl.gz", "teacher.backend": "offline",
        "pairs.negative_types": "minor_replacement,cross_author"}}))
    monkeypatch.chdir(project)
    assert main(["pipeline", str(recipe), "--dry_run"]) == 0
    assert main(["pipeline", str(recipe), "--only", "synth"]) == 0
    manifest = json.loads((project / "runs" / "rel" / "data" / "manifest.json").read_text())
    assert manifest["config"]["input"] == str(project / "data" / "corpus.jsonl.gz")
    assert (project / "runs" / "rel" / "data" / "pairs.jsonl").stat().st_size > 0
    monkeypatch.chdir(tmp_path / "elsewhere")  # from another folder the same recipe names a missing corpus
    assert main(["pipeline", str(recipe), "--dry_run"]) == 2
    assert f"synth.input {tmp_path}/elsewhere/data/corpus.jsonl.gz does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ a stage that learnt nothing

def _copy_model(src, dst, *, bump=0.0, dtype=None):
    """A script that copies checkpoint ``src`` to ``dst``, optionally nudging one tensor or casting all."""
    return ("import shutil, torch\n"
            "from safetensors.torch import load_file, save_file\n"
            f"shutil.copytree({str(src)!r}, {str(dst)!r})\n"
            f"p = {str(dst)!r} + '/model.safetensors'\n"
            "t = load_file(p)\n"
            f"k = sorted(t)[0]; t[k] = t[k] + {bump!r}\n"
            + (f"t = {{n: v.to(torch.{dtype}) for n, v in t.items()}}\n" if dtype else "")
            + "save_file(t, p, metadata={'format': 'pt'})\n")


def test_weights_changed_compares_tensors(tmp_path, tiny_model):
    import subprocess
    import sys

    from openrlhf_persrm.pipeline import weights_changed

    for name, kwargs, expected in (("same", {}, False), ("bf16", {"dtype": "bfloat16"}, False),
                                   ("bumped", {"bump": 0.5}, True)):
        subprocess.run([sys.executable, "-c", _copy_model(tiny_model, tmp_path / name, **kwargs)], check=True)
        assert weights_changed(tiny_model, str(tmp_path / name)) is expected, name
    assert weights_changed("no/such-hub-model", str(tmp_path / "same")) is None


def test_pipeline_says_when_a_stage_left_the_weights_unchanged(tmp_path, tiny_model, capsys):
    import sys

    from openrlhf_persrm.pipeline import Stage

    sft, grpo = tmp_path / "run" / "sft", tmp_path / "run" / "grpo"

    class Scripted(Pipeline):
        def plan(self):
            return [Stage("sft", [sys.executable, "-c", _copy_model(tiny_model, sft)], [str(sft / "config.json")],
                          {}, weights=(tiny_model, str(sft))),
                    Stage("grpo", [sys.executable, "-c", _copy_model(sft, grpo, bump=0.25)],
                          [str(grpo / "config.json")], {}, weights=(str(sft), str(grpo)))]

    manifest = Scripted(Recipe.load(_recipe(tmp_path))).run()
    out = capsys.readouterr().out
    assert manifest["stages"]["sft"]["weights_changed"] is False
    assert "identical to its input" in manifest["stages"]["sft"]["warning"]
    assert f"!! WARNING: stage sft left the weights unchanged: {sft} is identical to its input {tiny_model}" in out
    assert manifest["stages"]["grpo"]["weights_changed"] is True and "warning" not in manifest["stages"]["grpo"]
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["stages"]["sft"]["weights_changed"] is False


def test_dry_run_checks_a_local_base_model(tmp_path, monkeypatch):
    import io

    monkeypatch.chdir(tmp_path)
    recipe = Recipe.load(_recipe(tmp_path, model="./models/base", sft={"data.max_len": 512}))
    with pytest.raises(RecipeError, match=f"model.model_name_or_path {tmp_path}/models/base does not exist"):
        Pipeline(recipe).dry_run(out=io.StringIO())
    (tmp_path / "models" / "base").mkdir(parents=True)
    plan = {s["name"]: s for s in Pipeline(recipe).dry_run(out=io.StringIO())}
    argv = plan["sft"]["argv"]
    assert argv[argv.index("--model.model_name_or_path") + 1] == str(tmp_path / "models" / "base")


def test_the_progress_line_shows_progress_not_other_libraries_warnings():
    from openrlhf_persrm.pipeline import progress_line

    warning = ("/x/torch/cuda/__init__.py:64: FutureWarning: The pynvml package is deprecated.\n"
               "  import pynvml  # type: ignore[import]\n")
    assert progress_line(warning) is None or "pynvml" not in progress_line(warning)
    bar = "Train epoch:  10%|#  | 3/30 [00:30<04:30, loss=0.41]\r[transformers] Ignoring clean_up_tokenization"
    assert progress_line(bar).startswith("Train epoch:  10%")
    assert progress_line("judging (model): 40/96 [00:50<01:10]\n" + warning).startswith("judging (model)")


def test_an_evidence_recipe_trains_cards_into_every_checkpoint_and_lora_feeds_the_merged_model(tmp_path):
    synth = {"input": "demo", "teacher.backend": "offline", "evidence.scorer": "smollm2-135m-instruct",
             "traces.style": "reader", "pairs.negative_types": "minor_replacement,cross_author"}
    recipe = Recipe.load(_recipe(tmp_path, synth=synth, sft={"ds.lora.rank": 8}, grpo={},
                                 eval={"judges": ["reader", "base", "sft", "likelihood@grpo"]}))
    pipe = Pipeline(recipe)
    assert pipe.lora and pipe.trained("sft").endswith("sft/merged")
    grpo = next(s for s in pipe.plan() if s.name == "grpo")
    assert grpo.argv[grpo.argv.index("--actor.model_name_or_path") + 1] == pipe.trained("sft")
    base_argv = pipe.eval_argv("base", "/m/base")
    assert base_argv[base_argv.index("--evidence") + 1] == "on" and "/m/base" in base_argv
    assert pipe.eval_argv("sft", "/m/base")[pipe.eval_argv("sft", "/m/base").index("--model") + 1] == pipe.trained("sft")
    own = pipe.eval_argv("likelihood@grpo", "/m/base")
    assert own[own.index("--judge") + 1] == "likelihood" and own[own.index("--model") + 1] == str(pipe.work / "grpo")
    assert pipe.eval_argv("reader", "/m/base")[-2:] == ["--scorer", "/m/base"]
    # the card goes into the stage's model and every checkpoint it saved
    for folder in (pipe.work / "sft", pipe.work / "sft_ckpt" / "global_step5_hf"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    pipe.write_cards("sft")
    from openrlhf_persrm.models import read_judge_card

    for folder in (pipe.work / "sft", pipe.work / "sft_ckpt" / "global_step5_hf"):
        assert read_judge_card(folder)["evidence"] == {"version": 1, "scorer": "smollm2-135m-instruct"}
    plain = Pipeline(Recipe.load(_recipe(tmp_path, sft={})))
    assert plain.card() is None and not plain.lora


def test_the_report_names_every_stage_time_and_can_be_rewritten_without_judging(tmp_path, monkeypatch, capsys):
    from openrlhf_persrm.report import main as report_main

    path = _recipe(tmp_path, eval={"split": "test_unseen_authors", "limit": 10, "judges": ["random"]},
                   report=str(tmp_path / "docs" / "t.md"))
    Pipeline(Recipe.load(path)).run()
    run = tmp_path / "run"
    report = (run / "eval" / "report.md").read_text()
    # written while the eval stage runs: its time so far is in it too
    assert "Stage times on the machine that ran it: synth" in report and "eval 0 min" in report
    assert (tmp_path / "docs" / "t.md").read_text() == report
    stamp = (run / "eval" / "random" / "metrics.json").stat().st_mtime_ns
    (run / "eval" / "report.md").unlink()
    monkeypatch.chdir(tmp_path)
    assert report_main([str(path)]) == 0
    assert "## Judges" in (run / "eval" / "report.md").read_text()
    assert (run / "eval" / "random" / "metrics.json").stat().st_mtime_ns == stamp  # nothing judged again
    with pytest.raises(SystemExit):
        report_main([str(_recipe(tmp_path, workdir=str(tmp_path / "nothing-run")))])
