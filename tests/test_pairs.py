import json

import pytest
from conftest import make_pair, write_rows

from openrlhf_persrm.pairs import PairFormatError, PairRecord, Trace, load_pairs, read_pairs, write_pairs


def test_roundtrip_keeps_extra_fields(tmp_path):
    rows = [make_pair(i, split="train", work="emma") for i in range(3)]
    src = write_rows(tmp_path / "in.jsonl", rows)
    records = list(read_pairs(src))
    assert [r.extra["work"] for r in records] == ["emma"] * 3
    out = tmp_path / "out.jsonl"
    assert write_pairs(out, records) == 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.mark.parametrize("field,value,expect", [
    ("exemplars", [], "exemplars"),
    ("exemplars", "one string", "exemplars"),
    ("exemplars", ["ok", 3], "exemplars[1]"),
    ("chosen", 5, "'chosen': expected a string, got int"),
    ("rejected", "   ", "'rejected': expected a non-empty string"),
    ("author", None, "got null"),
])
def test_bad_field_names_file_line_field(tmp_path, field, value, expect):
    src = write_rows(tmp_path / "bad.jsonl", [make_pair(0), make_pair(1, **{field: value})])
    with pytest.raises(PairFormatError) as err:
        list(read_pairs(src))
    msg = str(err.value)
    assert f"{src}:2:" in msg and expect in msg
    assert err.value.line == 2 and err.value.field == field


def test_missing_field_and_bad_json(tmp_path):
    row = make_pair(0)
    del row["negative_type"]
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps(row) + "\n{not json\n")
    with pytest.raises(PairFormatError, match=r"x.jsonl:1: field 'negative_type' is missing"):
        list(read_pairs(src))
    records, report = load_pairs(src, skip_invalid=True)
    assert records == [] and report.skipped == 2
    assert "skipped 2 invalid" in str(report)


def test_identical_chosen_and_rejected_is_not_a_pair(tmp_path):
    src = write_rows(tmp_path / "x.jsonl", [make_pair(0, rejected=make_pair(0)["chosen"])])
    with pytest.raises(PairFormatError, match="identical"):
        list(read_pairs(src))


def test_skip_invalid_counts_and_keeps_good_rows(tmp_path):
    rows = [make_pair(0), make_pair(1, exemplars=[]), make_pair(2), make_pair(3, chosen=None)]
    records, report = load_pairs(write_rows(tmp_path / "x.jsonl", rows), skip_invalid=True)
    assert [r.id for r in records] == ["pair-0", "pair-2"]
    assert report.read == 2 and report.skipped == 2
    assert report.reasons == {"exemplars": 1, "chosen": 1}


def test_trace_must_rank_real_text_higher():
    ok = Trace.from_json({"reasoning": "r", "chosen_position": "B", "scores": [3, 9]})
    assert ok.scores == (3, 9)
    for bad in ({"reasoning": "r", "chosen_position": "A", "scores": [3, 9]},
                {"reasoning": "r", "chosen_position": "A", "scores": [5, 5]},
                {"reasoning": "r", "chosen_position": "C", "scores": [9, 3]},
                {"reasoning": "", "chosen_position": "A", "scores": [9, 3]},
                {"reasoning": "r", "chosen_position": "A", "scores": [11, 3]},
                {"reasoning": "r", "chosen_position": "A", "scores": [True, 3]}):
        with pytest.raises(PairFormatError):
            Trace.from_json(bad)
    with pytest.raises(PairFormatError, match="trace"):
        PairRecord.from_json(make_pair(0, trace={"reasoning": "r", "chosen_position": "A", "scores": [1, 2]}))


def test_write_is_atomic_on_error(tmp_path):
    out = tmp_path / "out.jsonl"
    write_pairs(out, [make_pair(0)])
    with pytest.raises(PairFormatError, match="record 1"):
        write_pairs(out, [make_pair(0), make_pair(1, exemplars=[])])
    assert len(out.read_text().splitlines()) == 1  # the old file is intact
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
