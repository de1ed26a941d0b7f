"""Pure parts of data_synth: table tests and property tests (no I/O beyond tmp files)."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_synth.config import PairConfig, SplitConfig, SynthConfig, TeacherConfig, TraceConfig
from data_synth.corpus import CorpusFormatError, load_corpus
from data_synth.lexicon import find_wordnet_dir, load_wordnet
from data_synth.negatives import NegativeBounds, check_negative, clean_continuation, minor_replacement
from data_synth.stylometry import evidence, evidence_trace
from data_synth.text import levenshtein, normalize_space, split_prompt, split_sentences
from openrlhf_persrm.judge_format import format_target, parse_judgment
from openrlhf_persrm.pairs import Trace


@pytest.mark.parametrize("text, expected", [
    ("One. Two! Three?", ["One.", "Two!", "Three?"]),
    ("Mr. Holmes sat. Dr. Watson stood.", ["Mr. Holmes sat.", "Dr. Watson stood."]),
    ('"Well?" said he. It was late.', ['"Well?" said he.', "It was late."]),
    ("J. R. Smith came. He left.", ["J. R. Smith came.", "He left."]),
    ("no end", ["no end"]),
    ("", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcdefg ", min_size=1, max_size=40), min_size=1, max_size=8))
def test_split_prompt_keeps_every_word(parts):
    text = ". ".join(p.strip() or "x" for p in parts) + "."
    cut = split_prompt(text, min_prompt_words=2, min_continuation_words=2)
    if cut is not None:
        prompt, continuation = cut
        assert normalize_space(prompt + " " + continuation) == normalize_space(text)
        assert len(prompt.split()) >= 2 and len(continuation.split()) >= 2


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=12), st.text(max_size=12))
def test_levenshtein_is_a_metric(a, b):
    assert levenshtein(a, b) == levenshtein(b, a)
    assert (levenshtein(a, b) == 0) == (a == b)
    assert levenshtein(a, b) <= max(len(a), len(b))


def _write(path, lines, gz=False):
    data = "".join(l + "\n" for l in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


GOOD = json.dumps({"author": "a", "work": "w", "idx": 0, "text": "Some text."})


@pytest.mark.parametrize("lines, line, field, words", [
    ([GOOD, "{not json"], 2, None, "invalid JSON"),
    ([json.dumps({"author": "a", "work": "w", "idx": 1})], 1, "text", "'text'"),
    ([json.dumps({"author": "a", "work": "w", "idx": "3", "text": "t"})], 1, "idx", "integer"),
    ([json.dumps({"author": "", "work": "w", "idx": 1, "text": "t"})], 1, "author", "non-empty"),
    ([GOOD, json.dumps({"user": "u", "text": "t"})], 2, "user", "mixes schemas"),
    ([GOOD, GOOD.replace("Some", "Other")], 2, "idx", "already appears"),
    ([json.dumps({"text": "t"})], 1, "author", "missing"),
    (["[1, 2]"], 1, None, "JSON object"),
])
def test_corpus_errors_name_file_line_and_field(tmp_path, lines, line, field, words):
    path = _write(tmp_path / "c.jsonl", lines)
    with pytest.raises(CorpusFormatError) as err:
        load_corpus(path)
    assert err.value.line == line and err.value.field == field
    assert str(err.value).startswith(f"{path}:{line}: ") and words in str(err.value)


def test_corpus_reads_gzip_and_per_user_schema(tmp_path):
    path = _write(tmp_path / "c.jsonl.gz", [GOOD, json.dumps({"author": "a", "work": "w", "idx": 1,
                                                                "text": "Some  text."})], gz=True)
    corpus = load_corpus(path)
    assert len(corpus.paragraphs) == 1 and corpus.duplicates_dropped == 1
    users = _write(tmp_path / "u.jsonl", [json.dumps({"user": "bob", "text": f"line {i}"}) for i in range(3)])
    corpus = load_corpus(users)
    assert corpus.schema == "user" and [p.idx for p in corpus.paragraphs] == [0, 1, 2]


@pytest.mark.parametrize("kind, chosen, rejected, reason", [
    ("cross_author", "a b c d", "", "empty"),
    ("cross_author", "a b c d", "A  b c D", "identical"),
    ("cross_author", "a b c d e f g h", "a", "length_ratio"),
    ("minor_replacement", "a b c d e f g h", "x b c d e f g h", "edit_distance"),
    ("minor_replacement", "a b c d e f g h", "x y z w e f g h i", "edit_distance"),
    ("minor_replacement", "a b c d e f g h", "x y z d e f g h", None),
    ("style_mimic", "one two three four five six", "alpha beta gamma delta epsilon", None),
])
def test_check_negative(kind, chosen, rejected, reason):
    assert check_negative(kind, chosen, rejected) == reason


def test_check_negative_rejects_copied_exemplar():
    ex = " ".join(f"w{i}" for i in range(30))
    copied = " ".join(f"w{i}" for i in range(14))
    assert check_negative("style_mimic", "x " * 14, copied, exemplars=[ex]) == "copies_source"


@pytest.mark.parametrize("raw, expected", [
    ("Sure! Here is the continuation:\nIt rained.", "It rained."),
    ("<think>plan</think>The night fell.", "The night fell."),
    ('"A quoted reply."', "A quoted reply."),
    ("Opening. Then more.", "Then more."),
    ("Continuation: short", "short"),
])
def test_clean_continuation(raw, expected):
    assert clean_continuation(raw, "Opening.") == expected


def test_clean_continuation_cuts_at_sentence_boundary():
    out = clean_continuation("One two three. Four five six. Seven eight nine.", "", max_words=7)
    assert out == "One two three. Four five six."


@pytest.fixture(scope="module")
def wordnet():
    return load_wordnet(find_wordnet_dir())


@pytest.fixture(scope="module")
def demo_texts():
    from data_synth.pipeline import demo_corpus_path
    return [p.text for p in load_corpus(demo_corpus_path()).paragraphs]


def test_minor_replacement_changes_only_the_listed_words(wordnet, demo_texts):
    made = 0
    for i, text in enumerate(demo_texts[::3]):
        out = minor_replacement(text, wordnet, random.Random(i))
        if out is None:
            continue
        made += 1
        new, replaced = out
        assert 3 <= len(replaced) <= 4
        # Undo the replacements from the end: we must get the original back, byte for byte.
        rebuilt = new
        shift = sum(len(r.replacement) - len(r.original) for r in replaced)
        for r in reversed(replaced):
            shift -= len(r.replacement) - len(r.original)
            at = r.position + shift
            assert rebuilt[at:at + len(r.replacement)] == r.replacement
            rebuilt = rebuilt[:at] + r.original + rebuilt[at + len(r.replacement):]
        assert rebuilt == text
        assert check_negative("minor_replacement", text, new, bounds=NegativeBounds()) is None
    assert made >= 20


EX = ["It was a dark night; the ship rolled heavily, and I watched the harbour lights from my window."]
NEAR = "The ship rolled; I watched the dark harbour, and the lights went out one by one."
FAR = "Wow! This blender is great, you will love how fast it works!"


@pytest.mark.parametrize("position", ["A", "B"])
@pytest.mark.parametrize("brief", [True, False])
def test_evidence_trace_argues_for_the_text_its_evidence_favours(position, brief):
    t = evidence_trace(EX, "Prompt.", NEAR, FAR, position, brief=brief)
    assert t.outcome == "favours_real"
    trace = Trace.from_json({"reasoning": t.reasoning, "chosen_position": position, "scores": list(t.scores)})
    parsed = parse_judgment(format_target(trace.reasoning, *trace.scores))
    assert parsed.ok and parsed.preferred == position
    # It cites the shared words it counted, and claims nothing only the label could tell.
    for w in evidence(EX, NEAR).shared:
        assert w in t.reasoning
    for claim in ("synonym", "swapped", "real text", "generated", "copied"):
        assert claim not in t.reasoning.lower()


@pytest.mark.parametrize("position", ["A", "B"])
def test_no_evidence_trace_when_the_evidence_favours_the_negative(position):
    # Same texts on screen, labels flipped: the evidence still favours NEAR, so no trace may
    # conclude for FAR. A trace that restated the label would.
    t = evidence_trace(EX, "Prompt.", FAR, NEAR, position)
    assert t.reasoning is None and t.scores is None and t.outcome == "evidence_disagrees"
    tie = evidence_trace(EX, "Prompt.", NEAR, NEAR.replace("ship", "boat").replace("dark", "black"), position)
    assert tie.outcome in ("evidence_disagrees", "favours_real")


def test_evidence_trace_depends_only_on_what_is_shown():
    # The real text at A or at B: the same evidence lines, scores swapped.
    a = evidence_trace(EX, "Prompt.", NEAR, FAR, "A")
    b = evidence_trace(EX, "Prompt.", NEAR, FAR, "B")
    assert a.scores == b.scores[::-1]
    assert a.reasoning.splitlines()[0] == b.reasoning.splitlines()[0]


@pytest.mark.parametrize("make, flag", [
    (lambda: SplitConfig(unseen_authors=-1), "--split.unseen_authors"),
    (lambda: SplitConfig(validation=1.5), "--split.validation"),
    (lambda: PairConfig(negative_types=("nonsense",)), "--pairs.negative_types"),
    (lambda: PairConfig(min_exemplars=4, max_exemplars=2), "--pairs.min_exemplars"),
    (lambda: PairConfig(min_length_ratio=1.2), "--pairs.min_length_ratio"),
    (lambda: TeacherConfig(backend="gpt"), "--teacher.backend"),
    (lambda: TeacherConfig(backend="openai", base_url="http://x/v1"), "--teacher.model"),
    (lambda: TeacherConfig(backend="openai", base_url="localhost:8000", model="m"), "--teacher.base_url"),
    (lambda: TraceConfig(orders="all"), "--traces.orders"),
    (lambda: SynthConfig(input="x", output_dir="y", pairs=PairConfig(negative_types=("style_mimic",))),
     "--pairs.negative_types"),
])
def test_config_errors_name_the_flag(make, flag, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError) as err:
        make()
    assert flag in str(err.value)


def test_cli_flags_are_dotted_and_parse():
    from data_synth.cli import config_from_args, make_parser
    ns = make_parser().parse_args(["--input", "demo", "--output_dir", "o", "--split.unseen_authors", "2",
                                   "--pairs.negative_types", "cross_author", "--progress", "false"])
    cfg = config_from_args(ns)
    assert cfg.split.unseen_authors == 2 and cfg.pairs.negative_types == ("cross_author",) and not cfg.progress


def test_importing_data_synth_is_cheap():
    code = ("import sys, data_synth, data_synth.cli, data_synth.pipeline, data_synth.teachers; "
            "bad = [m for m in ('torch', 'transformers', 'httpx') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
