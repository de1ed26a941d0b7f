"""Data without shortcuts (issue: "A PersRM that learns"), on the shipped demo corpus so it runs on a fresh clone.

Real and negative texts must differ in the person, not in artefacts: one typography on both sides, teacher
replies cut at max_tokens never kept, exemplars from another work than the target, cross-author negatives
answering the same prompt; and the artefact judge that measures what is left.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openai_server import FakeOpenAIServer  # noqa: E402

from data_synth.cli import main as synth_main  # noqa: E402
from data_synth.negatives import NEUTRAL_PROMPT, clean_continuation, ends_sentence  # noqa: E402
from data_synth.text import normalize_typography  # noqa: E402
from openrlhf_persrm.eval.judges import ArtefactJudge, artefact_features, shortcut_report  # noqa: E402
from openrlhf_persrm.pairs import PairRecord, load_pairs  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_synth")
    assert synth_main(["--input", "demo", "--output_dir", str(out), "--progress", "false",
                       "--pairs.negative_types", "minor_replacement,cross_author"]) == 0
    pairs, _ = load_pairs(out / "pairs.jsonl")
    return out, pairs, json.loads((out / "manifest.json").read_text())


def _uid(ref: str) -> tuple[str, str, int]:
    author, work, idx = ref.rsplit("/", 2)
    return author, work, int(idx)


def test_exemplars_come_from_another_work_by_default(demo_run):
    _, pairs, manifest = demo_run
    same = Counter()
    for p in pairs:
        author, work, idx = _uid(p.id.split(":")[0])
        for ref in p.extra["exemplar_refs"]:
            e_author, e_work, e_idx = _uid(ref)
            assert e_author == author
            if e_work == work:
                # Only where allowed (train, --split.same_work_fallback), far from the target, and flagged.
                assert p.extra["split"] == "train" and p.extra.get("same_work_exemplars") is True
                assert abs(e_idx - idx) >= 50
                same[p.extra["split"]] += 1
    assert sum(1 for p in pairs if p.extra["split"] != "train") > 20   # the rule was exercised
    assert manifest["same_work_exemplars"].get("train", 0) == sum(
        p.extra["split"] == "train" and bool(p.extra.get("same_work_exemplars")) for p in pairs)


def test_same_work_exemplars_only_when_asked(tmp_path):
    assert synth_main(["--input", "demo", "--output_dir", str(tmp_path), "--progress", "false",
                       "--pairs.negative_types", "cross_author", "--split.same_work_fallback", ""]) == 0
    pairs, _ = load_pairs(tmp_path / "pairs.jsonl")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert pairs and not any(p.extra.get("same_work_exemplars") for p in pairs)
    assert any(k.endswith(":no_other_work") for k in manifest["planning_skipped"])
    for p in pairs:
        work = _uid(p.id.split(":")[0])[1]
        assert all(_uid(ref)[1] != work for ref in p.extra["exemplar_refs"])


def test_every_text_has_one_typography(demo_run):
    _, pairs, _ = demo_run
    for p in pairs:
        for text in (p.prompt, p.chosen, p.rejected, *p.exemplars):
            assert text == normalize_typography(text)
            assert not any(c in text for c in "\u201c\u201d\u2018\u2019*_\n")


def test_teacher_text_is_normalised_like_real_text():
    raw = 'Sure! Here is the continuation:\n\u201cIt was *very* late -- too late,\u201d she said\u2026\n\nThen _silence_.'
    real = '"It was very late \u2014 too late," she said... Then silence.'
    assert clean_continuation(raw, "Opening.") == normalize_typography(real) == real


def test_cross_author_pairs_answer_the_same_neutral_prompt(demo_run):
    _, pairs, manifest = demo_run
    cross = [p for p in pairs if p.negative_type == "cross_author"]
    assert cross and all(p.prompt == NEUTRAL_PROMPT for p in cross)
    corpus = {(r["author"], r["work"], r["idx"]): normalize_typography(r["text"])
              for r in map(json.loads, Path("openrlhf_persrm/data/demo_corpus.jsonl").read_text().splitlines())}
    for p in cross:
        assert p.chosen == corpus[_uid(p.id.split(":")[0])]            # the whole paragraph
        src = p.extra["negative"]["source_uid"]
        assert p.rejected == corpus[_uid(src)] and _uid(src)[0] != p.author
    assert manifest["negative_types"] == {"headline": ["minor_replacement", "cross_author"], "topic_separable": []}


def test_continuation_cross_author_is_reported_topic_separable(tmp_path):
    assert synth_main(["--input", "demo", "--output_dir", str(tmp_path), "--progress", "false",
                       "--pairs.negative_types", "cross_author", "--pairs.cross_author_prompt", "continuation"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["negative_types"] == {"headline": [], "topic_separable": ["cross_author"]}


def test_truncated_teacher_replies_are_retried_and_never_kept(tmp_path):
    with FakeOpenAIServer(truncate_rate=0.5, bad_content_rate=0.0) as srv:
        rc = synth_main(["--input", "demo", "--output_dir", str(tmp_path), "--teacher.backend", "openai",
                         "--teacher.base_url", srv.base_url, "--teacher.model", "fake-teacher",
                         "--corpus.max_authors", "4", "--corpus.max_paragraphs_per_author", "16",
                         "--pairs.negative_types", "style_random,style_mimic", "--traces.splits", "",
                         "--split.exemplar_source", "any", "--progress", "false"])
        assert rc == 0 and srv.stats["truncated"] > 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tries = Counter()
    for reasons in manifest["failed_tries"].values():
        tries.update(reasons)
    assert tries["truncated"] > 0
    pairs, _ = load_pairs(tmp_path / "pairs.jsonl")
    assert pairs and all(ends_sentence(p.rejected) for p in pairs)


def _pair(i: int, chosen: str, rejected: str, split: str = "train") -> PairRecord:
    return PairRecord(f"p{i}", "a", ["An exemplar."], "Prompt.", chosen, rejected, "style_mimic", {"split": split})


def test_artefact_judge_finds_truncation_and_is_antisymmetric():
    train = [_pair(i, f"He walked home at {i} and slept.", f"He walked home at {i} and then he") for i in range(40)]
    test = [_pair(100 + i, f"She said {i} words.", f"She said {i} words and", "test") for i in range(20)]
    judge = ArtefactJudge().fit(train)
    assert judge.identity()["fitted_on_pairs"] == 40
    for p in test:
        a, b = judge.score(p, "A")
        b2, a2 = judge.score(p, "B")
        assert a > b and (a, b) == (a2, b2)     # real text wins in either order; swapping swaps
    report = shortcut_report([p.to_json() for p in train + test])
    assert report["test"]["style_mimic"]["artefact"] == 1.0


def test_artefact_judge_stays_near_chance_without_artefacts():
    # Real against real (both finished, one typography): artefacts carry no label.
    import random
    rng = random.Random(0)
    texts = [f"{' '.join(rng.choice(['the', 'sea', 'was', 'calm', 'and', 'grey']) for _ in range(rng.randint(8, 30)))}."
             for _ in range(400)]
    rows = [_pair(i, texts[2 * i], texts[2 * i + 1], "train" if i < 150 else "test") for i in range(200)]
    report = shortcut_report([p.to_json() for p in rows])
    assert 0.35 <= report["test"]["style_mimic"]["artefact"] <= 0.65


def test_artefact_features_are_surface_only():
    f = artefact_features('"Well," he said -- and stopped')
    assert f["ends_letter"] == 1.0 and f["ends_sentence"] == 0.0 and f["starts_quote"] == 1.0
    assert set(artefact_features("x")) == set(f)


def test_manifest_reports_shortcuts_by_split_and_type(demo_run):
    _, pairs, manifest = demo_run
    sc = manifest["shortcuts"]
    assert sc["fit_split"] == "train" and sc["fitted_on"] == sum(p.extra["split"] == "train" for p in pairs)
    for split in ("test_unseen_authors", "test_unseen_works"):
        for ntype, row in sc[split].items():
            assert 0.0 <= row["artefact"] <= 1.0 and 0.0 <= row["stylometry"] <= 1.0 and row["n"] > 0


def test_persrm_eval_artefact_judge(demo_run, tmp_path):
    from openrlhf_persrm.eval.cli import main as eval_main

    out, _, _ = demo_run
    assert eval_main(["--pairs", str(out / "pairs.jsonl"), "--split", "test_unseen_works", "--judge", "artefact",
                      "--both_orders", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["judge"]["name"] == "artefact" and m["judge"]["fitted_on_pairs"] > 0
    # Antisymmetric: never a position preference. Each pair gets the same verdict in both orders (a tie
    # where the two texts have the same artefacts, as synonym swaps often do).
    verdicts: dict[str, set] = {}
    for line in (tmp_path / "judgments.jsonl").read_text().splitlines():
        j = json.loads(line)
        verdicts.setdefault(j["id"], set()).add(j["verdict"])
    assert verdicts and all(len(v) == 1 for v in verdicts.values())
    assert eval_main(["--pairs", str(out / "pairs.jsonl"), "--split", "test_unseen_works", "--judge", "artefact",
                      "--fit_split", "nowhere", "--out", str(tmp_path / "x")]) != 0
