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
    ({"eval": {"judges": ["oracle"]}}, "unknown \\['oracle'\\]"),
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
