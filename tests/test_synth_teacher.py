"""The teacher path against a real HTTP server speaking the OpenAI chat-completions protocol."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openai_server import FakeOpenAIServer  # noqa: E402

from data_synth.cli import main  # noqa: E402
from data_synth.teachers import (CachedTeacher, ChatRequest, OpenAITeacher, ResponseCache,  # noqa: E402
                                 TeacherError, TeacherFatal, TransformersTeacher)
from openrlhf_persrm.judge_format import format_target, parse_judgment  # noqa: E402
from openrlhf_persrm.pairs import load_pairs  # noqa: E402


def _req(i: int, judge: bool = False) -> ChatRequest:
    system = "You are PersRM, a judge." if judge else "You are a writer."
    user = ("<exemplars>\nthe cat sat\n</exemplars>\n<response_a>\nthe cat\n</response_a>\n"
            "<response_b>\na dog\n</response_b>") if judge else f"Continue about 20 words. Opening: {i}"
    return ChatRequest.make([{"role": "system", "content": system}, {"role": "user", "content": user}],
                            max_tokens=64, temperature=0.7, seed=i)


def test_retries_timeouts_500s_and_malformed_bodies():
    with FakeOpenAIServer(fail_rate=0.3, slow_rate=0.2, slow_seconds=1.0, malformed_rate=0.2,
                          bad_content_rate=0.0) as srv:
        async def go():
            t = OpenAITeacher(base_url=srv.base_url, model="fake-teacher", concurrency=8, timeout=0.4,
                              retries=4, backoff=0.01)
            try:
                return await asyncio.gather(*[t.chat(_req(i)) for i in range(30)]), t.stats
            finally:
                await t.aclose()
        replies, stats = asyncio.run(go())
    assert all(isinstance(r, str) and r for r in replies)
    assert stats["http_500"] > 0 and stats["timeouts"] > 0 and stats["malformed_bodies"] > 0
    assert stats["ok"] == 30


def test_fatal_and_transient_errors():
    with FakeOpenAIServer() as srv:
        async def wrong_model():
            t = OpenAITeacher(base_url=srv.base_url, model="nope", retries=0)
            try:
                await t.chat(_req(0))
            finally:
                await t.aclose()
        with pytest.raises(TeacherFatal, match="--teacher.model"):
            asyncio.run(wrong_model())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    async def down():
        t = OpenAITeacher(base_url=f"http://127.0.0.1:{dead}/v1", model="m", retries=1, backoff=0.01)
        try:
            await t.chat(_req(0))
        finally:
            await t.aclose()
    with pytest.raises(TeacherError, match="gave up after 2 attempts"):
        asyncio.run(down())


def test_concurrency_is_bounded_and_used():
    with FakeOpenAIServer(latency=0.1) as srv:
        async def go():
            t = OpenAITeacher(base_url=srv.base_url, model="fake-teacher", concurrency=4)
            try:
                start = time.perf_counter()
                await asyncio.gather(*[t.chat(_req(i)) for i in range(20)])
                return time.perf_counter() - start
            finally:
                await t.aclose()
        elapsed = asyncio.run(go())
        assert srv.max_in_flight == 4
    assert 0.45 < elapsed < 1.5  # 20 requests / 4 in flight * 0.1 s


def test_cache_answers_repeated_requests_from_disk(tmp_path):
    with FakeOpenAIServer() as srv:
        async def go():
            inner = OpenAITeacher(base_url=srv.base_url, model="fake-teacher")
            t = CachedTeacher(inner, ResponseCache(str(tmp_path / "c.sqlite")))
            try:
                first = [await t.chat(_req(i, judge=True)) for i in range(3)]
                second = [await t.chat(_req(i, judge=True)) for i in range(3)]
                return first, second, t.stats
            finally:
                await t.aclose()
        first, second, stats = asyncio.run(go())
        assert first == second and srv.stats["requests"] == 3 and stats["cache_hits"] == 3


def test_teacher_end_to_end_through_the_cli(tmp_path):
    with FakeOpenAIServer(latency=0.005, fail_rate=0.1, slow_rate=0.03, slow_seconds=1.5, malformed_rate=0.05,
                          bad_content_rate=0.1) as srv:
        rc = main(["--input", "demo", "--output_dir", str(tmp_path), "--teacher.backend", "openai",
                   "--teacher.base_url", srv.base_url, "--teacher.model", "fake-teacher",
                   "--teacher.timeout", "0.5", "--teacher.backoff", "0.02", "--teacher.concurrency", "16",
                   "--corpus.max_paragraphs_per_author", "12", "--progress", "false"])
        assert rc == 0
        assert srv.stats["http_500"] and srv.stats["malformed"] and srv.stats["slow"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    pairs, _ = load_pairs(tmp_path / "pairs.jsonl")
    types = {p.negative_type for p in pairs}
    assert types == {"minor_replacement", "style_mimic", "style_random", "cross_author"}
    assert all(p.extra["negative"]["source"] == "teacher:fake-teacher"
               for p in pairs if p.negative_type in ("style_mimic", "style_random"))
    assert all("style" in p.extra["negative"] for p in pairs if p.negative_type == "style_random")
    assert manifest["teacher"] == {"backend": "openai", "model": "fake-teacher", "base_url": srv.base_url}
    traces = manifest["traces"]
    assert traces["kind"] == "teacher" and 0 < traces["acceptance_rate"] < 1
    assert traces["judgments"]["prefers_negative"] > 0
    assert any(k.startswith("unreadable:") for k in traces["judgments"])
    sft, _ = load_pairs(tmp_path / "sft.jsonl")
    assert sft and abs(sum(p.trace.chosen_position == "A" for p in sft) * 2 - len(sft)) <= 1
    for p in sft:
        t = p.trace
        assert t.source == "teacher:fake-teacher"
        judged = parse_judgment(format_target(t.reasoning, *t.scores))
        assert judged.ok and judged.preferred == t.chosen_position
    assert manifest["failed_tries"]  # some negatives were retried or rejected, and counted


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    try:
        from _tiny import tiny_causal_lm
    except ImportError:
        pytest.skip("tests/_tiny.py not available")
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


def test_transformers_backend_with_a_tiny_model(tiny_model, tmp_path):
    teacher = TransformersTeacher(tiny_model)
    req = ChatRequest.make([{"role": "user", "content": "Continue: the cat"}], max_tokens=8, temperature=0.8, seed=3)

    async def go():
        return [await teacher.chat(req), await teacher.chat(req)]
    a, b = asyncio.run(go())
    assert isinstance(a, str) and a == b  # seeded sampling: same request, same reply
    assert teacher.identity["backend"] == "transformers" and teacher.stats["requests"] == 2
    rc = main(["--input", "demo", "--output_dir", str(tmp_path), "--teacher.backend", "transformers",
               "--teacher.model", tiny_model, "--teacher.max_tokens", "24", "--teacher.judge_max_tokens", "16",
               "--corpus.max_authors", "3", "--corpus.max_paragraphs_per_author", "8",
               # eight consecutive paragraphs come from one work: let exemplars come from it too
               "--split.exemplar_source", "any",
               "--split.unseen_authors", "0", "--split.unseen_works", "0", "--traces.tries", "1",
               "--pairs.max_tries", "1", "--pairs.negative_types", "style_random,cross_author",
               "--traces.fallback", "bootstrap", "--progress", "false"])
    assert rc == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["teacher"]["backend"] == "transformers"
    # A random tiny model writes noise: its negatives and traces are rejected and counted, never kept silently.
    planned = sum(v.get("style_random", 0) for v in manifest["planned"].values())
    made = sum(v.get("style_random", 0) for v in manifest["counts"].values())
    assert planned == made + sum(manifest["rejected_pairs"].get("style_random", {}).values())
    traces = manifest["traces"]
    assert traces["teacher_accepted"] == 0 and traces["acceptance_rate"] == 0.0
    assert traces["bootstrap_written"] == traces["pairs_with_trace"]
    assert traces["bootstrap_written"] + sum(traces["bootstrap_skipped"].values()) == traces["bootstrap_fallback"]
