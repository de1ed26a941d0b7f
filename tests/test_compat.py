"""Pins every OpenRLHF 0.11.2 fact openrlhf_persrm.compat relies on: an upgrade fails here, loudly."""

import inspect

import pytest

from openrlhf_persrm import OPENRLHF_VERSION, compat

# Flags the wrappers read or set, per launcher.
REQUIRED_FLAGS = {
    "train_sft": ["data.dataset", "eval.dataset", "data.input_key", "data.output_key", "data.apply_chat_template",
                  "data.max_len", "model.model_name_or_path", "ds.attn_implementation", "ds.packing_samples",
                  "ckpt.output_dir"],
    "train_ppo_ray": ["data.prompt_dataset", "eval.dataset", "data.input_key", "data.label_key",
                      "data.apply_chat_template", "data.max_len", "actor.model_name_or_path", "reward.remote_url",
                      "train.agent_func_path", "rollout.n_samples_per_prompt", "algo.advantage.estimator",
                      "vllm.num_engines", "vllm.tensor_parallel_size", "vllm.sync_backend", "train.colocate_all",
                      "train.async_enable"],
}


def test_installed_version_is_the_one_compat_is_written_for():
    assert compat.check_openrlhf_version() == OPENRLHF_VERSION == "0.11.2"


def test_version_mismatch_fails_clearly(monkeypatch):
    monkeypatch.setattr(compat, "installed_openrlhf_version", lambda: "0.12.0")
    monkeypatch.delenv(compat.ENV_ALLOW_MISMATCH, raising=False)
    with pytest.raises(compat.OpenRLHFVersionError, match="0.12.0 is installed but .* written for 0.11.2"):
        compat.check_openrlhf_version()
    monkeypatch.setenv(compat.ENV_ALLOW_MISMATCH, "1")
    assert compat.check_openrlhf_version() == "0.12.0"
    monkeypatch.setattr(compat, "installed_openrlhf_version", lambda: None)
    with pytest.raises(compat.OpenRLHFVersionError, match="not installed"):
        compat.check_openrlhf_version()


@pytest.mark.parametrize("launcher", sorted(REQUIRED_FLAGS))
def test_launcher_parser_is_captured_with_the_flags_we_use(launcher):
    parser = compat.launcher_parser(launcher)
    dests = {a.dest for a in parser._actions}
    missing = [f for f in REQUIRED_FLAGS[launcher] if f not in dests]
    assert not missing, f"OpenRLHF {launcher} no longer has flags {missing}"
    ns = vars(parser.parse_args([]))  # parsing is side-effect free: no training started
    assert ns["data.max_len"] == 2048


def test_ray_env_defaults_match_upstream_train():
    import openrlhf.cli.train_ppo_ray as upstream

    src = inspect.getsource(upstream.train)
    assert "if not ray.is_initialized():" in src, "train() no longer skips ray.init when Ray is up"
    for key, default in compat.RAY_ENV_DEFAULTS.items():
        assert f'"{key}", "{default}"' in src, f"upstream train() no longer sets {key}={default}"


def test_reward_file_contract_upstream():
    """OpenRLHF loads `--reward.remote_url *.py` by path and calls `reward_func` from a thread."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    init = inspect.getsource(SingleTurnAgentExecutor.__init__)
    assert 'endswith(".py")' in init and "reward_module.reward_func" in init
    fetch = inspect.getsource(SingleTurnAgentExecutor._fetch_rewards_via_func)
    assert "asyncio.to_thread" in fetch


def test_unknown_launcher():
    with pytest.raises(ValueError, match="unknown launcher 'train_xyz'; known: train_sft, train_ppo_ray"):
        compat.launcher_parser("train_xyz")


# --------------------------------------------------------------------------- trainer-plugin hooks

def _params(fn):
    return [p for p in inspect.signature(fn).parameters if p != "_ray_trace_ctx"]  # Ray's tracing wrapper adds it


def test_ppo_trainer_facts_the_trainer_hooks_rely_on():
    compat.install_flash_attn_stub()
    compat.ensure_vllm_importable()
    from openrlhf.cli import train_ppo_ray
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    # train() imports the trainer class when it runs, so a subclass put there first is the one started
    assert "from openrlhf.trainer.ppo_trainer import PPOTrainer" in inspect.getsource(train_ppo_ray.train)
    raw = ppo_trainer.PPOTrainer.__ray_actor_class__
    assert issubclass(raw, ppo_trainer.BasePPOTrainer)
    assert _params(raw.train_step) == ["self", "rollout_samples", "global_step"]
    assert _params(raw.save_logs_and_checkpoints) == ["self", "global_step", "logs_dict", "client_states"]
    assert _params(raw.save_best_checkpoint) == ["self", "eval_metrics", "global_step", "client_states"]
    assert "self.best_eval_metric_key" in inspect.getsource(ppo_trainer.BasePPOTrainer.__init__)
    assert "self.save_logs_and_checkpoints(global_step, status, client_states)" in inspect.getsource(raw.fit)
    # rewards are final when compute_advantages_and_returns starts: it is where advantages are made
    src = inspect.getsource(RemoteExperienceMaker.make_experience_batch)
    assert "self.compute_advantages_and_returns(experiences)" in src
    assert src.index("self.make_experience(") < src.index("self.compute_advantages_and_returns(")
    empty = Experience()
    for name in ("sequences", "action_mask", "rewards", "prompts", "labels", "truncated", "index", "info"):
        assert hasattr(empty, name), name
    assert [p for p in _params(RolloutRayActor.generate) if p != "self"][:2] == ["prompt_token_ids", "sampling_params"]


def test_sft_trainer_facts_the_trainer_hooks_rely_on():
    compat.install_flash_attn_stub()
    import openrlhf.cli.train_sft as cli
    from openrlhf.trainer.sft_trainer import SFTTrainer

    assert "from openrlhf.trainer.sft_trainer import SFTTrainer" in inspect.getsource(cli)
    assert _params(SFTTrainer.save_logs_and_checkpoints) == ["self", "args", "global_step", "step_bar",
                                                             "logs_dict", "client_states"]
    assert "self.save_logs_and_checkpoints(args, engine.global_steps" in inspect.getsource(SFTTrainer.fit)


def test_install_trainer_hooks_swaps_in_subclasses_once():
    import subprocess
    import sys

    code = (
        "from openrlhf_persrm import compat\n"
        "compat.install_trainer_hooks('train_ppo_ray'); compat.install_trainer_hooks('train_ppo_ray')\n"
        "compat.install_trainer_hooks('train_sft')\n"
        "from openrlhf.trainer import ppo_trainer, sft_trainer\n"
        "raw = ppo_trainer.PPOTrainer.__ray_actor_class__\n"
        "assert raw.__module__ == 'openrlhf_persrm.compat', raw\n"
        "assert [c.__module__ for c in raw.__mro__[:3]] == ['openrlhf_persrm.compat', 'openrlhf.trainer.ppo_trainer',"
        " 'openrlhf.trainer.ppo_trainer'], raw.__mro__\n"
        "assert sft_trainer.SFTTrainer.__module__ == 'openrlhf_persrm.compat'\n"
        "assert sft_trainer.SFTTrainer.__mro__[1].__module__ == 'openrlhf.trainer.sft_trainer'\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_before_advantages_sees_the_whole_step_and_writes_rewards_back(caplog, monkeypatch):
    import logging
    from types import SimpleNamespace

    import torch
    from _tiny import train_tokenizer

    from openrlhf_persrm.contracts import StepResult, TrainerPlugin
    from openrlhf_persrm.trainers.hooks import HookRunner

    compat.install_flash_attn_stub()
    from openrlhf.trainer.ppo_utils.experience import Experience

    tok = train_tokenizer()
    texts = ["A", "B better", "short", "the longest answer"]
    rows = []
    for i, text in enumerate(texts):
        p_ids, r_ids = tok("prompt", add_special_tokens=False)["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([p_ids + r_ids])
        mask = torch.tensor([[0] * (len(p_ids) - 1) + [1] * len(r_ids)])
        exp = Experience(sequences=seq, attention_mask=torch.ones_like(seq), action_mask=mask,
                         prompts=["prompt"], labels=[{"n": i}], rewards=torch.tensor([0.0]),
                         truncated=torch.tensor([True]), info={"reward": torch.tensor([0.0])})
        exp.index = [i]
        rows.append(exp)
    # micro-batches out of step order, padded: the hook must still see samples in step order
    experiences = [Experience.concat_experiences([rows[2], rows[0]], tok.pad_token_id),
                   Experience.concat_experiences([rows[3], rows[1]], tok.pad_token_id)]
    seen = {}

    class ByLength(TrainerPlugin):
        name = "by_length"

        def on_rollout_step(self, *, step):
            seen["step"] = step
            return StepResult([float(len(s.response)) for s in step.samples], {"n": float(len(step.samples))})

    args = SimpleNamespace(rollout=SimpleNamespace(n_samples_per_prompt=2, max_new_tokens=8),
                           algo=SimpleNamespace(advantage=SimpleNamespace(estimator="group_norm")))
    trainer = SimpleNamespace(args=args, tokenizer=tok, _persrm_runner=HookRunner([ByLength()], "rl"), _persrm_step=5)
    monkeypatch.setattr(compat, "_step_logger", lambda: logging.getLogger("persrm.test.health"))
    with caplog.at_level(logging.WARNING, logger="persrm.test.health"):
        metrics = compat.before_advantages(trainer, experiences)
    step = seen["step"]
    assert [s.response for s in step.samples] == texts and [s.group for s in step.samples] == [0, 0, 1, 1]
    assert [s.label for s in step.samples] == [{"n": i} for i in range(4)] and step.global_step == 5
    assert metrics == {"n": 4.0}
    assert experiences[0].rewards.tolist() == [5.0, 1.0] and experiences[1].rewards.tolist() == [18.0, 8.0]
    assert experiences[1].info["reward"].tolist() == [18.0, 8.0]
    assert "step 5: every rollout hit --rollout.max_new_tokens (8)" in caplog.text  # all truncated
    assert "identical rewards" not in caplog.text


def test_cpu_float32_patch_makes_openrlhf_load_and_train_in_float32():
    # In a fresh process: the patch is process-wide.
    import subprocess
    import sys

    code = (
        "import os; os.environ['PERSRM_CPU_DTYPE'] = 'fp32'\n"
        "from openrlhf_persrm import compat\n"
        "assert compat.cpu_float32()\n"
        "compat.train_in_float32()\n"
        "import torch\n"
        "from openrlhf.utils.utils import convert_to_torch_dtype\n"
        "from openrlhf.utils.deepspeed import deepspeed as ds\n"
        "assert convert_to_torch_dtype('bf16') is torch.float32\n"
        "cfg = ds.get_train_ds_config(offload=False, param_dtype='bf16')\n"
        "assert cfg['bf16']['enabled'] is False and cfg['fp16']['enabled'] is False, cfg\n"
        "ev = ds.get_eval_ds_config(offload=False, param_dtype='bf16')\n"
        "assert ev['bf16']['enabled'] is False\n"
        "os.environ['PERSRM_CPU_DTYPE'] = 'bf16'; assert not compat.cpu_float32()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --------------------------------------------------------------------------- rewards that cannot be computed

def test_openrlhf_facts_behind_surfacing_reward_failures():
    compat.install_flash_attn_stub()
    compat.ensure_vllm_importable()
    from openrlhf.trainer.ppo_utils import experience_maker
    from openrlhf.utils import agent

    cls = agent.SingleTurnAgentExecutor  # OpenRLHF's own methods: the tests that patch them restore them
    execute = inspect.getsource(cls.execute)
    assert "except Exception as e:" in execute and "Failed to fetch reward from remote RM" in execute
    assert "self._fetch_rewards_via_func(" in execute and "self._fetch_rewards_via_http(" in execute
    http = inspect.getsource(cls._fetch_rewards_via_http)
    assert "aiohttp.ClientSession(timeout=timeout)" in http and "asyncio.create_task(" in http
    assert "raise_for_status()" in http
    assert "reward_model_group is required" in inspect.getsource(experience_maker)


@pytest.fixture
def surfaced(monkeypatch):
    """surface_reward_failures() applied for one test, OpenRLHF's own methods restored after it."""
    compat.install_flash_attn_stub()
    from openrlhf.utils import agent

    cls = agent.SingleTurnAgentExecutor
    for name in ("execute", "_fetch_rewards_via_func", "_fetch_rewards_via_http"):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    monkeypatch.setattr(agent, "aiohttp", agent.aiohttp)
    monkeypatch.setattr(cls, "_persrm_surfaced", False, raising=False)
    compat.surface_reward_failures()
    return cls


class _Engine:
    """A rollout engine that answers every prompt with two tokens."""

    async def generate(self, prompt_token_ids, params, multi_modal_data=None):
        from openrlhf_persrm.cpu.vllm_types import CompletionOutput, RequestOutput

        return RequestOutput("r", None, list(prompt_token_ids), None,
                             [CompletionOutput(0, "", [5, 6], None, None, "stop")], True)


def _execute(executor_cls, remote, tiny_model):
    import asyncio

    from transformers import AutoTokenizer

    from openrlhf_persrm.cpu.vllm_types import SamplingParams

    executor = executor_cls(remote)
    return asyncio.run(executor.execute("Say hi.", "label", SamplingParams(max_tokens=4), 64,
                                        AutoTokenizer.from_pretrained(tiny_model), _Engine()))


def _reward_file(tmp_path, body: str) -> str:
    path = tmp_path / "reward.py"
    path.write_text("from openrlhf_persrm.judges.faults import JudgeUnavailable\n\n"
                    f"def reward_func(queries, prompts, labels):\n    {body}\n")
    return str(path)


def test_a_reward_function_that_raises_ends_the_step_with_its_cause(tmp_path, tiny_model, surfaced):
    down = _reward_file(tmp_path, "raise JudgeUnavailable('the judge failed 100% of the samples')")
    with pytest.raises(compat.RewardUnavailable, match="JudgeUnavailable: the judge failed 100% of the samples"):
        _execute(surfaced, down, tiny_model)
    fine = _reward_file(tmp_path, "return {'rewards': [0.5], 'scores': [0.75], 'extra_logs': {}}")
    assert _execute(surfaced, fine, tiny_model)["reward"] == [0.5]  # a reward that arrives is untouched


def test_without_the_patch_openrlhf_drops_the_cause(tmp_path, tiny_model, monkeypatch):
    compat.install_flash_attn_stub()
    from openrlhf.utils import agent

    down = _reward_file(tmp_path, "raise JudgeUnavailable('gone')")
    assert _execute(agent.SingleTurnAgentExecutor, down, tiny_model)["reward"] is None


def test_a_reward_server_error_answer_is_the_cause(tiny_model, surfaced, monkeypatch):
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Down(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"detail": "the judge is down: it failed 100% of the samples"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s, *a, **k: real_sleep(0))  # OpenRLHF waits 1 s between tries
    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/get_reward"
        with pytest.raises(compat.RewardUnavailable,
                           match=r"5 times.*last answer: HTTP 503: .*the judge is down: it failed 100%"):
            _execute(surfaced, url, tiny_model)
    finally:
        server.shutdown()


def test_reward_failure_finds_the_cause_however_it_is_wrapped():
    from ray.exceptions import RayTaskError

    from openrlhf_persrm.judges.faults import JudgeUnavailable

    cause = compat.RewardUnavailable("no reward for a sample: the judge is down")
    inner = RayTaskError("generate_responses", "Traceback ...", cause).as_instanceof_cause()
    outer = RayTaskError("fit", "Traceback ...", inner).as_instanceof_cause()
    assert compat.reward_failure(outer) == "no reward for a sample: the judge is down"
    try:
        try:
            raise JudgeUnavailable("probe failed (unreachable)")
        except JudgeUnavailable as exc:
            raise RuntimeError("actor died") from exc
    except RuntimeError as chained:
        assert compat.reward_failure(chained) == "JudgeUnavailable: probe failed (unreachable)"
    text_only = RuntimeError("The actor died.\n  ...\nopenrlhf_persrm.judges.faults.JudgeUnavailable: persrm: the "
                             "judge failed its start-up probe (server_error)\n")
    assert compat.reward_failure(text_only) == "JudgeUnavailable: persrm: the judge failed its start-up probe (server_error)"
    assert compat.reward_failure(ValueError("reward_model_group is required")) is None


def test_openrlhf_facts_behind_stopping_when_a_rollout_engine_cannot_start():
    compat.install_flash_attn_stub()
    compat.ensure_vllm_importable()
    import openrlhf.cli.train_ppo_ray as upstream
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    train = inspect.getsource(upstream.train)
    call = "actor_model.async_init_model_from_pretrained(strategy, args.actor.model_name_or_path, max_steps, vllm_engines)"
    assert call in " ".join(train.split()).replace("( ", "(").replace(" )", ")")
    assert "    ray.get(refs)\n" in train  # the refs' values are not used
    init = PolicyModelActor.__ray_actor_class__.init_model_from_pretrained
    assert _params(init)[:5] == ["self", "strategy", "pretrain", "max_steps", "vllm_engines"]
    assert "return [actor.init_model_from_pretrained.remote(" in inspect.getsource(
        RayActorGroup.async_init_model_from_pretrained)
    assert callable(RolloutRayActor.__ray_actor_class__.get_num_unfinished_requests)
