"""The rough edges of `persrm synth`: names that collide, damaged inputs, a damaged work log, stale temp files.

Each bad input must end in one clear message naming file, line and field (exit 2, no traceback); a
damaged work log loses only its damaged lines.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data_synth.cli import main
from data_synth.corpus import CorpusFormatError, load_corpus
from data_synth.pipeline import OUTPUT_FILES, WORK_DIR, WorkLog

REPO = Path(__file__).resolve().parents[1]


def _row(author="a", work="w", idx=0, text=None) -> str:
    return json.dumps({"author": author, "work": work, "idx": idx, "text": text or f"Text {author} {work} {idx}."})


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- names that become one id

@pytest.mark.parametrize("first, second", [("Ann Lee", "Ann_Lee"), ("Ann Lee", "Ann/Lee"), ("Ann_Lee", "Ann/Lee")])
def test_author_spellings_that_become_one_id_are_refused(tmp_path, first, second):
    path = _write(tmp_path / "c.jsonl", [_row(first, idx=0), _row("Bob"), _row(second, idx=1)])
    with pytest.raises(CorpusFormatError) as err:
        load_corpus(path)
    msg = str(err.value)
    assert err.value.line == 3 and err.value.field == "author" and msg.startswith(f"{path}:3: ")
    assert repr(first) in msg and repr(second) in msg and "(line 1)" in msg and "'Ann_Lee'" in msg


def test_work_and_user_spellings_that_become_one_id_are_refused(tmp_path):
    path = _write(tmp_path / "w.jsonl", [_row("a", "Vol 1", 0), _row("a", "Vol/1", 1)])
    with pytest.raises(CorpusFormatError, match=r"w\.jsonl:2: field 'work': .*'Vol/1' and 'Vol 1' \(line 1\)"):
        load_corpus(path)
    users = _write(tmp_path / "u.jsonl", [json.dumps({"user": u, "text": f"t {i}"})
                                          for i, u in enumerate(["x", "Ann Lee", "Ann.Lee", "Ann_Lee"])])
    with pytest.raises(CorpusFormatError) as err:
        load_corpus(users)
    assert err.value.line == 4 and err.value.field == "user" and "'Ann Lee' (line 2)" in str(err.value)


def test_same_spelling_is_one_author_and_a_key_clash_shows_the_names_as_written(tmp_path):
    corpus = load_corpus(_write(tmp_path / "ok.jsonl", [_row("Ann Lee", idx=0), _row(" Ann Lee ", idx=1)]))
    assert corpus.authors() == ["Ann_Lee"] and len(corpus.paragraphs) == 2
    path = _write(tmp_path / "dup.jsonl", [_row("Ann Lee", "Book 1", 3), _row("Ann Lee", "Book 1", 3, "Other.")])
    with pytest.raises(CorpusFormatError) as err:
        load_corpus(path)
    assert err.value.line == 2 and err.value.field == "idx"
    assert "author 'Ann Lee', work 'Book 1', idx 3 already appears on line 1" in str(err.value)


# --------------------------------------------------------------------------- damaged inputs

LINES = [_row("a", "w", i) for i in range(20)]


def _gzip_corrupt_after_10(path: Path) -> None:
    # Two gzip members (gzip readers concatenate them); the second's first deflate block has the
    # reserved block type 11, so zlib fails there: after line 10.
    good = gzip.compress("".join(l + "\n" for l in LINES[:10]).encode(), mtime=0)
    bad = bytearray(gzip.compress("".join(l + "\n" for l in LINES[10:]).encode(), mtime=0))
    bad[10] = 0x07
    path.write_bytes(good + bytes(bad))


def _gzip_truncated(path: Path) -> None:
    data = gzip.compress("".join(l + "\n" for l in LINES).encode(), mtime=0)
    path.write_bytes(data[: len(data) - 20])


def _gzip_bad_crc(path: Path) -> None:
    data = bytearray(gzip.compress("".join(l + "\n" for l in LINES).encode(), mtime=0))
    data[-8] ^= 0xFF  # the CRC32 of the member
    path.write_bytes(bytes(data))


def _nested(path: Path) -> None:
    path.write_text(LINES[0] + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")


def _latin1(path: Path) -> None:
    row = json.dumps({"author": "Ren\u00e9", "work": "w", "idx": 1, "text": "Caf\u00e9."}, ensure_ascii=False)
    path.write_bytes(LINES[0].encode() + b"\n" + row.encode("latin-1") + b"\n")


@pytest.mark.parametrize("name, make, line, words", [
    ("zlib.jsonl.gz", _gzip_corrupt_after_10, 11, "corrupt gzip data after line 10"),
    ("trunc.jsonl.gz", _gzip_truncated, None, "ends early (truncated)"),
    ("crc.jsonl.gz", _gzip_bad_crc, 21, "not a valid gzip file after line 20"),
    ("nested.jsonl", _nested, 2, "nested too deeply"),
    ("latin1.jsonl", _latin1, 2, "not UTF-8 text (byte 0xe9"),
])
def test_damaged_input_is_one_clear_error(tmp_path, capsys, name, make, line, words):
    path = tmp_path / name
    make(path)
    with pytest.raises(CorpusFormatError) as err:
        load_corpus(path)
    assert words in str(err.value) and str(err.value).startswith(f"{path}:")
    if line is not None:
        assert err.value.line == line and str(err.value).startswith(f"{path}:{line}: ")
    assert main(["--input", str(path), "--output_dir", str(tmp_path / "out"), "--progress", "false"]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith(f"persrm synth: error: {path}:") and words in printed


def test_input_directory_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--input", ".", "--output_dir", str(tmp_path / "out"), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("persrm synth: error: .: is a directory") and "--input" in err


# --------------------------------------------------------------------------- the work log

def _result(i: int) -> bytes:
    return json.dumps({"id": f"t{i}", "rejected": f"r{i}", "negative": {}, "failed_tries": {}}).encode() + b"\n"


@pytest.mark.parametrize("bad, field", [(b"{}", "id"), (b'{"id": "t1", "rejec', None), (b"[1]", None),
                                        (b'{"id": "t1", "rejected": "r", "negative": {}}', "failed_tries")])
def test_worklog_drops_only_a_corrupt_middle_line(tmp_path, caplog, bad, field):
    path = tmp_path / "results.jsonl"
    path.write_bytes(_result(0) + bad + b"\n" + b"".join(_result(i) for i in range(2, 6)))
    with caplog.at_level(logging.WARNING, logger="data_synth.pipeline"):
        done = WorkLog(path).load()
    assert sorted(done) == ["t0", "t2", "t3", "t4", "t5"]  # the valid lines after it are kept
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"{path}:2: corrupt line of 6" in msg and "torn" not in msg
    if field:
        assert f"'{field}'" in msg
    # Rewritten without the bad line: a second read is clean and silent.
    assert path.read_bytes() == _result(0) + b"".join(_result(i) for i in range(2, 6))
    caplog.clear()
    assert sorted(WorkLog(path).load()) == sorted(done) and not caplog.records


def test_worklog_torn_last_line_is_reported_as_such(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_bytes(_result(0) + _result(1) + b'{"id": "t2", "rej')
    with caplog.at_level(logging.WARNING, logger="data_synth.pipeline"):
        assert sorted(WorkLog(path).load()) == ["t0", "t1"]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"{path}:3: dropped a torn last line" in msg
    assert path.read_bytes() == _result(0) + _result(1)


SYNTH = ["--input", "demo", "--corpus.max_authors", "4", "--corpus.max_paragraphs_per_author", "14",
         "--progress", "false"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main([*SYNTH, "--output_dir", str(out)]) == 0
    lines = (out / WORK_DIR / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) > 20
    return out, lines


def _last_run_stats(out: Path) -> dict:
    return json.loads((out / WORK_DIR / "run_stats.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("bad", [b"{}\n", b'{"id": "x", "rejected": nul\n'])
def test_corrupt_middle_work_log_line_recomputes_only_its_task(full_run, tmp_path, caplog, bad):
    full, lines = full_run
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    for name in OUTPUT_FILES:
        (out / name).unlink()
    k = len(lines) // 2
    (out / WORK_DIR / "results.jsonl").write_bytes(b"".join(lines[:k]) + bad + b"".join(lines[k + 1:]))

    with caplog.at_level(logging.WARNING, logger="data_synth.pipeline"):
        assert main([*SYNTH, "--output_dir", str(out)]) == 0
    err = caplog.text
    assert f"results.jsonl:{k + 1}: corrupt line of {len(lines)}" in err and "torn" not in err
    stats = _last_run_stats(out)
    assert stats["tasks_finished_now"] == 1 and stats["tasks_done_before"] == len(lines) - 1
    assert sorted((out / WORK_DIR / "results.jsonl").read_bytes().splitlines()) == sorted(l.rstrip(b"\n")
                                                                                          for l in lines)
    for name in OUTPUT_FILES:
        assert (out / name).read_bytes() == (full / name).read_bytes(), f"{name} differs"


# Runs `persrm synth` with os.replace patched to SIGKILL the process at the rename that would finish
# writing one output: the kill lands exactly "during an output write", leaving that write's temp file.
_KILL_AT_WRITE = """
import os, signal, sys
target, real = sys.argv[1], os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from data_synth.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("target", ["sft.jsonl", "manifest.json"])
def test_rerun_removes_temp_files_of_a_killed_write(full_run, tmp_path, target):
    full, _ = full_run
    out = tmp_path / "killed"
    argv = [*SYNTH, "--output_dir", str(out)]
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_WRITE, target, *argv], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert len(left) == 1 and left[0].startswith(f".{target}.")  # what the kill left behind
    keep = [out / ".notes.tmp", out / "mine.tmp", out / f".{target}.bak"]  # not ours: left alone
    for p in keep:
        p.write_text("mine")

    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [".notes.tmp", "mine.tmp"]
    assert all(p.exists() for p in keep)
    assert _last_run_stats(out)["tasks_finished_now"] == 0  # the work log survived the kill
    for name in OUTPUT_FILES:
        assert (out / name).read_bytes() == (full / name).read_bytes(), f"{name} differs"


def test_stale_work_dir_temp_files_are_removed(full_run, tmp_path):
    full, _ = full_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    stale = [out / WORK_DIR / ".signature.json.tmp", out / WORK_DIR / ".results.jsonl.tmp",
             out / ".pairs.jsonl.k3x_9q.tmp"]
    for p in stale:
        p.write_text("partial")
    assert main([*SYNTH, "--output_dir", str(out)]) == 0
    assert not any(p.exists() for p in stale)


def test_output_dir_that_is_a_file_or_an_unreadable_signature_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([*SYNTH, "--output_dir", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.startswith(f"persrm synth: error: {tmp_path / 'afile'}")
    (tmp_path / "o" / WORK_DIR).mkdir(parents=True)
    (tmp_path / "o" / WORK_DIR / "signature.json").write_text("{bad")
    assert main([*SYNTH, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'o' / WORK_DIR / 'signature.json'}: unreadable" in err and "--output_dir" in err
