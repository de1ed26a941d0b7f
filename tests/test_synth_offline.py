"""An offline-only run over the shipped demo corpus (and a subset of the shared author corpus where present),
and the split-leakage test."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_synth.cli import main
from data_synth.config import SplitConfig
from data_synth.corpus import Paragraph, load_corpus
from data_synth.pipeline import demo_corpus_path
from data_synth.splits import exemplar_candidates, is_neighbour, split_corpus
from openrlhf_persrm.pairs import load_pairs

REPO = Path(__file__).resolve().parents[1]


def shared_corpus() -> str | None:
    for base in (os.environ.get("PERSRM_SHARED"), REPO / "shared", REPO.parent / "shared", "/work/shared"):
        if base and (Path(base) / "data/authors/paragraphs.jsonl.gz").exists():
            return str(Path(base) / "data/authors/paragraphs.jsonl.gz")
    return None


# "demo" is shipped in the package, so these tests run on a fresh clone; "shared" adds the large
# author corpus where it is present.
@pytest.fixture(scope="module", params=["demo", "shared"])
def offline_run(request, tmp_path_factory):
    src = demo_corpus_path() if request.param == "demo" else shared_corpus()
    if src is None:
        pytest.skip("shared/data/authors/paragraphs.jsonl.gz not found (set PERSRM_SHARED)")
    out = tmp_path_factory.mktemp(f"offline-{request.param}")
    rc = main(["--input", src, "--output_dir", str(out), "--corpus.max_authors", "8",
               "--corpus.max_paragraphs_per_author", "32", "--split.unseen_authors", "2", "--progress", "false",
               # 32 paragraphs per author are mostly one work: allow same-work exemplars for this smoke run
               "--split.exemplar_source", "any"])
    assert rc == 0
    return src, out


def test_offline_run_writes_readable_outputs(offline_run):
    src, out = offline_run
    manifest = json.loads((out / "manifest.json").read_text())
    pairs, report = load_pairs(out / "pairs.jsonl")
    assert report.skipped == 0 and len(pairs) == manifest["outputs"]["pairs.jsonl"]["rows"] > 50
    assert {p.negative_type for p in pairs} == {"minor_replacement", "cross_author"}
    assert manifest["teacher"]["backend"] == "offline"
    assert manifest["input"]["sha256"] and manifest["code_version"]["data_synth"]
    assert set(manifest["counts"]) == {"train", "validation", "test_unseen_authors", "test_unseen_works"}
    sft, _ = load_pairs(out / "sft.jsonl")
    assert sft and all(p.trace.source == "bootstrap:evidence" for p in sft)
    assert all(p.extra["split"] == "train" for p in sft)
    positions = Counter(p.trace.chosen_position for p in sft)
    assert abs(positions["A"] - positions["B"]) <= 1
    traces = manifest["traces"]
    # Nobody accepted anything offline: the acceptance rate says so; bootstrap traces are counted apart,
    # with the pairs whose evidence did not favour the real text.
    assert traces["kind"] == "bootstrap" and traces["acceptance_rate"] is None and traces["teacher_accepted"] == 0
    sft_val, _ = load_pairs(out / "sft_validation.jsonl")
    assert traces["bootstrap_written"] == len(sft) + len(sft_val) == traces["pairs_with_trace"]
    assert traces["bootstrap_written"] + sum(traces["bootstrap_skipped"].values()) == traces["bootstrap_fallback"]
    rl, _ = load_pairs(out / "rl.jsonl")
    assert sorted(p.id for p in rl) == sorted(p.id for p in pairs if p.extra["split"] == "train")
    keys = [(p.author, p.prompt, p.chosen, p.rejected) for p in pairs]
    assert len(keys) == len(set(keys))
    planned = sum(sum(v.values()) for v in manifest["planned"].values())
    made = sum(sum(v.values()) for v in manifest["counts"].values())
    rejected = sum(sum(v.values()) for v in manifest["rejected_pairs"].values())
    assert planned == made + rejected + manifest["pair_duplicates_removed"]


def test_no_split_leakage_in_outputs(offline_run):
    src, out = offline_run
    pairs, _ = load_pairs(out / "pairs.jsonl")
    manifest = json.loads((out / "manifest.json").read_text())
    # Every split has pairs, so each check below has something to check.
    assert {p.extra["split"] for p in pairs} == {"train", "validation", "test_unseen_authors", "test_unseen_works"}
    assert_no_split_leakage(pairs, manifest)


def test_leakage_check_catches_a_leak(offline_run):
    """The check above can fail: a test pair that shows a train paragraph as an exemplar is caught."""
    _, out = offline_run
    pairs, _ = load_pairs(out / "pairs.jsonl")
    manifest = json.loads((out / "manifest.json").read_text())
    train = next(p for p in pairs if p.extra["split"] == "train")
    test = next(p for p in pairs if p.extra["split"] == "test_unseen_works")
    test.exemplars[0] = train.chosen
    with pytest.raises(AssertionError):
        assert_no_split_leakage(pairs, manifest)


def assert_no_split_leakage(pairs, manifest) -> None:
    split_of_uid: dict[str, str] = {}
    for p in pairs:
        split = p.extra["split"]
        target = f"{p.author}/{p.extra['work']}/{p.extra['idx']}"
        refs = [target, *p.extra["exemplar_refs"]]
        if p.negative_type == "cross_author":
            refs.append(p.extra["negative"]["source_uid"])
            assert p.extra["negative"]["source_author"] != p.author
        for uid in refs:
            assert split_of_uid.setdefault(uid, split) == split, f"{uid} used in two splits"
        for ref in p.extra["exemplar_refs"]:
            author, work, idx = ref.rsplit("/", 2)
            assert author == p.author
            assert not (work == p.extra["work"] and abs(int(idx) - p.extra["idx"]) <= 2), "neighbour exemplar"
    # Texts too: no exemplar or target text of one split appears in another.
    text_split: dict[str, str] = {}
    for p in pairs:
        for t in [p.chosen, *p.exemplars]:
            assert text_split.setdefault(t, p.extra["split"]) == p.extra["split"]
    unseen = set(manifest["splits"]["unseen_authors"])
    assert unseen and all(p.extra["split"] == "test_unseen_authors" for p in pairs if p.author in unseen)
    for author, work in manifest["splits"]["unseen_works"].items():
        assert all(p.extra["split"] == "test_unseen_works" for p in pairs
                   if p.author == author and p.extra["work"] == work)
        assert any(p.extra["split"] == "train" for p in pairs if p.author == author)


def _corpus(draw_sizes: list[list[int]]) -> list[Paragraph]:
    out = []
    for a, works in enumerate(draw_sizes):
        for w, n in enumerate(works):
            out.extend(Paragraph(f"a{a}", f"w{w}", i, f"text {a} {w} {i}") for i in range(n))
    return out


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=3), min_size=3, max_size=8),
       seed=st.integers(0, 10_000), unseen=st.sampled_from([0.0, 0.2, 0.5, 2.0]),
       works=st.sampled_from([0.0, 0.5, 1.0]), val=st.sampled_from([0.0, 0.1, 0.3]))
def test_split_corpus_properties(sizes, seed, unseen, works, val):
    paragraphs = _corpus(sizes)
    cfg = SplitConfig(unseen_authors=unseen, unseen_works=works, validation=val, block_size=4)
    plan = split_corpus(paragraphs, cfg, seed)
    assert set(plan.split_of) == {p.uid for p in paragraphs}  # every paragraph in exactly one split
    assert plan == split_corpus(list(reversed(paragraphs)), cfg, seed)  # deterministic, order-free
    for p in paragraphs:
        s = plan.split_of[p.uid]
        if p.author in plan.unseen_authors:
            assert s == "test_unseen_authors"
        else:
            assert s != "test_unseen_authors"
        if plan.unseen_works.get(p.author) == p.work:
            assert s == "test_unseen_works" and p.uid not in plan.exemplar_only
    seen_train = {p.author for p in paragraphs if plan.split_of[p.uid] in ("train", "validation")}
    assert not seen_train & set(plan.unseen_authors)
    for p in paragraphs[:20]:
        for e in exemplar_candidates(p, paragraphs, 2, seed):
            assert e.author == p.author and not is_neighbour(p, e, 2)


def test_demo_corpus_is_small_and_documented():
    from data_synth.pipeline import demo_corpus_path
    path = Path(demo_corpus_path())
    corpus = load_corpus(path)
    assert path.stat().st_size < 1_000_000 and 8 <= len(corpus.authors()) <= 12
    doc = (path.parent / "DEMO_CORPUS.md").read_text()
    for author in corpus.authors():
        assert author in doc
