"""The CPU generation engine and the vLLM stand-in that OpenRLHF 0.11.2's rollout code drives."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from openrlhf_persrm.cpu import vllm_standin  # noqa: E402
from openrlhf_persrm.cpu.engine import BatchedEngine  # noqa: E402
from openrlhf_persrm.cpu.vllm_standin import SamplingParams  # noqa: E402


def _load_tiny():
    # tests/ is not a package (the openrlhf wheel owns a top-level `tests`): load _tiny by path.
    spec = importlib.util.spec_from_file_location("_persrm_tiny", Path(__file__).with_name("_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_causal_lm = _load_tiny().tiny_causal_lm

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other_model_path(tmp_path_factory) -> str:
    """Same architecture, different weights: the target of weight-sync tests."""
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture(scope="module")
def engine(model_path):
    eng = BatchedEngine.from_pretrained(model_path)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def one_at_a_time(model_path):
    eng = BatchedEngine.from_pretrained(model_path, max_num_seqs=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    texts = ["hello there", "The user prefers short answers.", "A", "Which response follows the persona?"]
    return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding without a KV cache or padding: a full forward pass per token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _tokens(outputs) -> list[list[int]]:
    return [[o.token_ids for o in request] for request in outputs]


def test_greedy_is_deterministic_and_matches_uncached_decoding(engine, prompts):
    first = engine.generate(prompts, GREEDY)
    second = engine.generate(prompts, GREEDY)
    assert _tokens(first) == _tokens(second)
    for prompt, request in zip(prompts, first):
        (out,) = request
        assert out.token_ids == _greedy_reference(engine.model, prompt, 12)
        assert out.finish_reason == "length" and out.logprobs is None


def test_batched_greedy_equals_one_request_at_a_time(engine, one_at_a_time, prompts):
    batched = engine.generate(prompts, GREEDY)
    alone = [one_at_a_time.generate([p], GREEDY)[0] for p in prompts]
    assert _tokens(batched) == _tokens(alone)


def test_late_arrivals_join_the_running_batch_without_changing_tokens(engine, prompts):
    expected = _tokens(engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    futures = [engine.submit(prompts[0], params)]
    time.sleep(0.05)  # the first request is decoding by now; the rest are merged into its batch
    futures += [engine.submit(p, params) for p in prompts[1:]]
    assert [[o.token_ids for o in f.result()] for f in futures] == expected


def test_stop_token_ids_and_min_tokens(engine, prompts):
    (free,) = engine.generate([prompts[0]], GREEDY)[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    (out,) = engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == free.token_ids[: first + 1]  # the stop token is kept in token_ids
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    assert out.text == engine.tokenizer.decode(out.token_ids[:-1])  # ... but not in the text

    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=first + 3, stop_token_ids=[stop_id])
    (held,) = engine.generate([prompts[0]], params)[0]
    assert len(held.token_ids) >= first + 3
    assert stop_id not in held.token_ids[: first + 3]
    if held.finish_reason == "stop":
        assert held.token_ids[-1] == stop_id


def test_eos_stops_unless_ignored(engine, prompts):
    (free,) = engine.generate([prompts[1]], GREEDY)[0]
    eos = free.token_ids[2]
    engine.eos_token_ids, saved = frozenset({eos}), engine.eos_token_ids
    try:
        (out,) = engine.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=12))[0]
        (ignored,) = engine.generate([prompts[1]], GREEDY)[0]
    finally:
        engine.eos_token_ids = saved
    assert out.token_ids[-1] == eos and out.finish_reason == "stop" and out.stop_reason is None
    assert ignored.token_ids == free.token_ids


def test_stop_strings(engine, prompts):
    (free,) = engine.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    text = free.text
    # An ASCII stop string: byte-level BPE text is stable under incremental decoding only there.
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].isalnum())
    at = text.index(stop)
    base = dict(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    (out,) = engine.generate([prompts[2]], SamplingParams(**base))[0]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, text[:at])
    assert free.token_ids[: len(out.token_ids)] == out.token_ids
    (kept,) = engine.generate([prompts[2]], SamplingParams(**base, include_stop_str_in_output=True))[0]
    assert kept.text == text[: at + len(stop)]


@pytest.mark.parametrize("mode, temperature", [("raw_logprobs", 0.7), ("processed_logprobs", 0.7)])
def test_logprobs_match_a_separate_forward_pass(model_path, prompts, mode, temperature):
    eng = BatchedEngine.from_pretrained(model_path, logprobs_mode=mode)
    try:
        params = SamplingParams(temperature=temperature, max_tokens=10, ignore_eos=True, logprobs=1, seed=3)
        outputs = eng.generate(prompts[:2], params)
    finally:
        eng.shutdown()
    for prompt, (out,) in zip(prompts, outputs):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = eng.model(ids).logits[0, len(prompt) - 1 : -1]
        if mode == "processed_logprobs":  # with top-p 1 / top-k off: OpenRLHF's log_softmax(logits / T)
            logits = logits / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        got = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert out.cumulative_logprob == pytest.approx(float(got.sum()), abs=1e-3)


def test_seeded_sampling_is_reproducible_and_independent_of_batching(engine, prompts):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True, seed=7)
    (alone,) = engine.generate([prompts[0]], params)
    crowded = engine.generate([prompts[0], prompts[1], prompts[2]], [params, GREEDY, params])
    assert [o.index for o in alone] == [0, 1, 2, 3]
    assert [o.token_ids for o in alone] == [o.token_ids for o in crowded[0]]
    assert len({tuple(o.token_ids) for o in alone}) > 1  # the n samples differ from each other
    other_seed = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=8)
    assert [o.token_ids for o in engine.generate([prompts[0]], other_seed)[0]] != [o.token_ids for o in alone]


def test_engine_does_not_import_the_standin():
    """The engine needs only the plain vLLM types; the stand-in imports the engine, not back."""
    import subprocess

    code = "import sys, openrlhf_persrm.cpu.engine; print('openrlhf_persrm.cpu.vllm_standin' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bad_sampling_params_are_refused():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1.2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_abort_cancels_and_pause_freezes(model_path, prompts):
    eng = BatchedEngine.from_pretrained(model_path)
    try:
        eng.pause()
        future = eng.submit(prompts[0], GREEDY, request_id="r1")
        time.sleep(0.05)
        assert not future.done() and eng.num_unfinished_requests() == 1
        eng.abort("r1")
        assert future.cancelled() and eng.num_unfinished_requests() == 0
        eng.resume()
        assert eng.generate([prompts[0]], GREEDY)[0][0].finish_reason == "length"
    finally:
        eng.shutdown()


# ------------------------------------------------------------------ OpenRLHF's own rollout code


@pytest.fixture(scope="module")
def openrlhf_vllm_engine():
    """OpenRLHF's unmodified ``vllm_engine`` module, imported over the installed stand-in."""
    vllm_standin.install()
    vllm_standin.install()  # idempotent
    # openrlhf.models needs flash-attn's CUDA extension to exist; an empty module will do on CPU.
    sys.modules.setdefault("flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
    from openrlhf.trainer.ray import vllm_engine

    return vllm_engine


def test_standin_satisfies_openrlhf_imports(openrlhf_vllm_engine):
    import vllm
    from openrlhf.trainer.ppo_utils.samples_generator import SamplingParams as OpenRLHFSamplingParams
    from openrlhf.utils.distributed_util import stateless_init_process_group  # noqa: F401
    from packaging import version
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    assert vllm_standin.is_installed()
    assert OpenRLHFSamplingParams is SamplingParams
    assert openrlhf_vllm_engine.vllm is vllm and vllm.AsyncLLMEngine is vllm_standin.AsyncLLMEngine
    assert StatelessProcessGroup is vllm_standin.StatelessProcessGroup
    assert PyNcclCommunicator is vllm_standin.PyNcclCommunicator
    # OpenRLHF's version gates (vllm_engine.py, ppo_actor.py) take the modern-vLLM branches.
    assert version.parse(vllm.__version__) >= version.parse("0.16")
    assert importlib.util.find_spec("vllm") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _rollout_actor(vllm_engine_module, model_path: str, monkeypatch, **overrides):
    """Build OpenRLHF's ``RolloutRayActor`` class (not as a Ray actor) with the kwargs
    ``create_vllm_engines`` passes."""
    # RAY_ADDRESS set: the actor would otherwise ask the (absent) Ray worker for it.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    cls = vllm_engine_module.RolloutRayActor.__ray_actor_class__
    kwargs = dict(
        model=model_path, enforce_eager=True, worker_extension_cls="openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap",
        tensor_parallel_size=1, seed=0, distributed_executor_backend="uni", max_model_len=256,
        enable_prefix_caching=False, dtype="bfloat16", trust_remote_code=True, full_determinism=False,
        gpu_memory_utilization=None, bundle_indices=None, num_gpus=1, enable_sleep_mode=True,
        agent_func_path=None, remote_rm_url=None, mm_pad_token_ids=set(),
        logprobs_mode="processed_logprobs", max_logprobs=1,
    )
    kwargs.update(overrides)
    actor = object.__new__(cls)
    await actor.__init__(**kwargs)
    return actor


def test_openrlhf_rollout_actor_sleep_wake_and_weight_sync(openrlhf_vllm_engine, model_path, other_model_path, monkeypatch):
    from openrlhf.utils.distributed_util import stateless_init_process_group
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    new_weights = AutoModelForCausalLM.from_pretrained(other_model_path, dtype=torch.float32)
    params = SamplingParams(temperature=0.0, top_k=-1, max_tokens=8, min_tokens=1, skip_special_tokens=False, logprobs=1)

    async def rollout(actor):
        return await actor.generate_responses("hello there", "label", params, 64, tokenizer, num_samples=3)

    async def scenario():
        actor = await _rollout_actor(openrlhf_vllm_engine, model_path, monkeypatch)
        before = await rollout(actor)
        assert len({tuple(r["observation_tokens"]) for r in before}) == 1  # greedy: 3 equal samples
        assert before[0]["rollout_log_probs"] is not None and actor.get_num_unfinished_requests() == 0

        await actor.sleep()
        assert await actor.llm.is_sleeping()
        with pytest.raises(RuntimeError, match="wake_up"):
            await rollout(actor)
        await actor.wake_up(tags=["weights"])
        assert await actor.llm.is_sleeping()  # the KV cache still sleeps

        # Trainer rank 0 as in ppo_actor.py: OpenRLHF's stateless group, then one broadcast per parameter.
        port = _free_port()
        named = list(new_weights.named_parameters())

        def trainer_rank0():
            group = stateless_init_process_group("127.0.0.1", port, 0, 2, "cpu")
            for _, param in named:
                group.broadcast(param.data, src=0, stream=None)

        sender = threading.Thread(target=trainer_rank0)
        sender.start()
        await actor.init_process_group("127.0.0.1", port, 1, 2, "openrlhf", "gloo", False)
        for name, param in named:
            await actor.update_weight(name, dtype=param.dtype, shape=param.shape, empty_cache=False)
        sender.join(timeout=30)
        await actor.reset_prefix_cache()
        await actor.wake_up(tags=["kv_cache"])
        assert not await actor.llm.is_sleeping()
        after = await rollout(actor)

        reference = await _rollout_actor(openrlhf_vllm_engine, other_model_path, monkeypatch)
        expected = await rollout(reference)
        await actor.pause_generation()
        await actor.resume_generation()
        actor.llm.shutdown()
        reference.llm.shutdown()
        return before, after, expected

    before, after, expected = asyncio.run(scenario())
    assert after[0]["observation_tokens"] != before[0]["observation_tokens"]
    assert [r["observation_tokens"] for r in after] == [r["observation_tokens"] for r in expected]


def test_gpu_only_options_are_refused(openrlhf_vllm_engine, model_path, monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        asyncio.run(_rollout_actor(openrlhf_vllm_engine, model_path, monkeypatch, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="max_images_per_prompt"):
        asyncio.run(_rollout_actor(openrlhf_vllm_engine, model_path, monkeypatch, limit_mm_per_prompt={"image": 1}))

    async def misuse():
        actor = await _rollout_actor(openrlhf_vllm_engine, model_path, monkeypatch)
        try:
            with pytest.raises(ValueError, match="sync_backend gloo"):
                await actor.update_weight_cuda_ipc("w", torch.float32, (1,), ipc_handles={})
            with pytest.raises(ValueError, match="sync_with_ray"):
                await actor.init_process_group("127.0.0.1", _free_port(), 1, 2, "g", "gloo", True)
            with pytest.raises(ValueError, match="multi_modal_data"):
                await actor.generate([1, 2, 3], SamplingParams(), multi_modal_data={"image": [object()]})
        finally:
            actor.llm.shutdown()

    asyncio.run(misuse())


# ------------------------------------------------------------------ the preallocated KV cache


def _hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """transformers' own greedy ``generate`` for one unpadded prompt, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        )
    ids = out[0, len(prompt) :].tolist()
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    return ids if stop is None else ids[: stop + 1]


@pytest.mark.parametrize("share_prefix", [0, 2])
def test_greedy_equals_transformers_generate_with_staggered_joins(model_path, share_prefix):
    """Requests of different prompt lengths join the running batch at different steps (only 3
    decode together, each finishing at its own length frees a slot for the next), the cache
    grows several times (3-column chunks), and the shared-prefix prefill is taken when on:
    every sequence still equals transformers' ``generate`` token for token."""
    eng = BatchedEngine.from_pretrained(
        model_path, max_num_seqs=3, kv_chunk_tokens=3, share_prefix_min_tokens=share_prefix
    )
    try:
        tails = [" likes hiking", " prefers short answers.", " A", " follows the persona? Answer with A or B.",
                 " reads science fiction on rainy weekends", " likes cooking, reading"]
        prompts = [eng.tokenizer("The user" + t, add_special_tokens=False)["input_ids"] for t in tails]
        assert len({len(p) for p in prompts}) == len(prompts)
        lengths = [5, 23, 9, 40, 3, 14]
        params = [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
        got = [out.token_ids for (out,) in eng.generate(prompts, params)]
        expected = [_hf_greedy(eng.model, p, n, eng.eos_token_ids) for p, n in zip(prompts, lengths)]
        assert got == expected
        assert eng._batch.rows == [] and eng._batch.cache is None  # everything freed when idle
    finally:
        eng.shutdown()


def test_decoding_writes_in_place_and_frees_finished_rows(model_path, monkeypatch):
    """The cache is copied once per chunk, not once per token; a finished row's slot is freed at
    once, and the free room never exceeds what the remaining rows can still use."""
    from openrlhf_persrm.cpu import engine as engine_module

    copies = []
    relayout = engine_module._relayout
    monkeypatch.setattr(engine_module, "_relayout", lambda *a: (copies.append(a[3]), relayout(*a)))
    eng = BatchedEngine.from_pretrained(model_path, kv_chunk_tokens=16)
    try:
        prompt = eng.tokenizer("The user prefers short answers.", add_special_tokens=False)["input_ids"]
        long, short = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (120, 4))
        eng.pause()
        futures = [eng.submit(prompt, long), eng.submit(prompt[:3], short)]
        eng.resume()
        futures[1].result()
        eng.pause()  # returns between steps
        batch = eng._batch
        (row,) = batch.rows  # the short request's row is gone ...
        layer = batch.cache.layers[0]
        assert layer.slab_keys.shape[0] == 1 and batch.mask.shape[0] == 1  # ... and so is its slot
        assert layer.keys.shape[2] == batch.length <= batch.capacity
        assert batch.capacity - batch.length <= row.max_tokens - len(row.token_ids)
        eng.resume()
        (out,) = futures[0].result()
        assert out.token_ids == _greedy_reference(eng.model, prompt, 120)
    finally:
        eng.shutdown()
    # 119 decoding steps, 7 copies: the short row leaving, then growth by 16 columns or a quarter
    # of the length, never past the longest row's need (prompt + 119 fed tokens).
    assert len(copies) <= 8, copies
    assert copies == sorted(copies) and copies[-1] == len(prompt) + 120 - 1, copies


def test_load_weights_changes_what_the_engine_generates(model_path, other_model_path, prompts):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(other_model_path, dtype=torch.float32)
    eng = BatchedEngine.from_pretrained(model_path)
    try:
        before = eng.generate(prompts, GREEDY)
        eng.load_weights(other.named_parameters())
        after = eng.generate(prompts, GREEDY)
    finally:
        eng.shutdown()
    assert _tokens(after) != _tokens(before)
    assert _tokens(after) == [[_greedy_reference(other, p, 12)] for p in prompts]


def test_grouped_query_attention_without_repeating_kv_heads_is_bit_identical(model_path):
    """The engine's SDPA path hands grouped KV heads to torch as they are (no per-step copy of
    the cache per query head); logits over a left-padded prefill and cached decoding steps equal
    transformers' own SDPA path exactly."""
    from openrlhf_persrm.cpu.engine import GQA_SDPA
    from transformers import AutoModelForCausalLM, DynamicCache

    eng = BatchedEngine.from_pretrained(model_path)
    eng.shutdown()
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    config = eng.model.config
    assert config.num_key_value_heads < config.num_attention_heads  # the tiny model groups its heads
    assert config._attn_implementation == GQA_SDPA and reference.config._attn_implementation == "sdpa"
    input_ids = torch.tensor([[0, 0, 0, 5, 9, 14, 7], [3, 8, 2, 11, 6, 4, 10]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    for model in (eng.model, reference):
        cache, ids, m, pos, logits = DynamicCache(config=model.config), input_ids, mask, positions, []
        with torch.no_grad():
            for _ in range(4):
                out = model(input_ids=ids, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                ids, pos = out.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:] + 1
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], dim=1)
        results.append(torch.stack(logits))
    assert torch.equal(results[0], results[1])
