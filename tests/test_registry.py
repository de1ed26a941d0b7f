"""Plugin registries: entry points (through an installed third-party package), the resolver,
and rejection of bad plugins at registration."""

import pytest

from openrlhf_persrm.contracts import PluginError, RewardOutput
from openrlhf_persrm.registry import (Registry, UnknownPluginError, dataset_plugins, instantiate, reward_plugins)


def test_builtin_and_third_party_plugins_come_from_entry_points():
    assert {"persrm_rule", "example_length"} <= set(reward_plugins.names())
    assert {"persrm_sft", "persrm_rl", "example_plain_sft"} <= set(dataset_plugins.names())
    cls = reward_plugins.get("example_length")
    assert cls.__module__ == "persrm_example_plugin"  # loaded from the installed package
    out = instantiate(reward_plugins, "example_length", {"target_words": 2})(["p one two"], ["p"], [None])
    assert isinstance(out, RewardOutput) and out.rewards == [1.0]


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownPluginError, match=r"unknown reward plugin 'nope'; known: .*example_length.*persrm_rule"):
        reward_plugins.resolve("nope")


def test_dotted_path_and_file(tmp_path):
    assert reward_plugins.resolve("openrlhf_persrm.rewards.rule:RuleReward").name == "persrm_rule"
    assert reward_plugins.resolve("openrlhf_persrm.rewards.rule.RuleReward").name == "persrm_rule"
    f = tmp_path / "my_reward.py"
    f.write_text(
        "from openrlhf_persrm.contracts import RewardOutput\n"
        "class Constant:\n"
        "    name = 'constant'\n"
        "    def __init__(self, value=0.5):\n"
        "        self.value = value\n"
        "    def __call__(self, queries, prompts, labels, **kw):\n"
        "        return RewardOutput([self.value] * len(queries), [1.0] * len(queries))\n")
    inst = instantiate(reward_plugins, str(f), {"value": 0.25})
    assert inst(["q"], ["p"], [None]).rewards == [0.25]
    assert instantiate(reward_plugins, f"{f}:Constant").value == 0.5
    with pytest.raises(PluginError, match="defines no 'Missing'"):
        reward_plugins.resolve(f"{f}:Missing")
    with pytest.raises(PluginError, match="cannot import 'no_such_module'"):
        reward_plugins.resolve("no_such_module:Thing")


def test_plain_reward_function_file(tmp_path):
    f = tmp_path / "plain.py"
    f.write_text("def reward_func(queries, prompts, labels, **kw):\n"
                 "    return {'rewards': [1.0] * len(queries)}\n")
    fn = instantiate(reward_plugins, f"{f}:reward_func")
    assert fn(["q"], ["p"], [None]) == {"rewards": [1.0]}
    with pytest.raises(ValueError, match="plain function and takes no configuration"):
        instantiate(reward_plugins, f"{f}:reward_func", {"x": 1})


def test_register_is_idempotent_and_clashes_raise():
    reg = Registry("reward", "openrlhf_persrm.test_group_none")

    @reg.register("mine")
    class Mine:
        name = "mine"

        def __call__(self, queries, prompts, labels, **kw):
            return RewardOutput([], [])

    reg.register("mine", Mine)  # the same object again: harmless (every worker may do it)

    class Other(Mine):
        pass

    with pytest.raises(PluginError, match="already registered"):
        reg.register("mine", Other)
    assert reg.get("mine") is Mine


@pytest.mark.parametrize("bad,match", [
    ("not callable", "not callable"),
])
def test_bad_reward_plugins_rejected_at_registration(bad, match):
    with pytest.raises(PluginError, match=match):
        reward_plugins.register("bad_one", bad)


def test_bad_reward_signatures_rejected_with_the_expected_signature():
    class TooFew:
        def __call__(self, queries):
            return None

    class NeedsArgs:
        def __init__(self, model_path):
            pass

        def __call__(self, queries, prompts, labels):
            return None

    class Async:
        async def __call__(self, queries, prompts, labels):
            return None

    async def async_fn(queries, prompts, labels):
        return None

    for obj, match in [(TooFew, "must accept"), (NeedsArgs, "required arguments"), (Async, "async def"),
                       (async_fn, "async def")]:
        with pytest.raises(PluginError, match=match) as err:
            reward_plugins.register("bad_sig", obj)
        assert "bad_sig" in str(err.value) and "queries, prompts, labels" in str(err.value)


def test_bad_dataset_plugin_rejected():
    class NoStage:
        def convert(self, src, dst, **kw):
            return 0

    with pytest.raises(PluginError, match="lacks stage, flags"):
        dataset_plugins.register("bad_ds", NoStage)


def test_plugin_that_fails_to_import_stops_when_asked(monkeypatch):
    class EP:
        name, value = "broken", "broken_pkg:Thing"

        def load(self):
            raise ImportError("No module named 'broken_pkg'")

    monkeypatch.setattr("openrlhf_persrm.registry.entry_points", lambda group: [EP()])
    reg2 = Registry("reward", "openrlhf_persrm.rewards")
    with pytest.raises(PluginError, match="'broken' .broken_pkg:Thing. failed to load: ImportError"):
        reg2.get("broken")


def test_bad_config_names_accepted_keys():
    with pytest.raises(ValueError, match="Accepted keys: correct_reward, wrong_reward, format_penalty"):
        instantiate(reward_plugins, "persrm_rule", {"format_penalt": -1})
