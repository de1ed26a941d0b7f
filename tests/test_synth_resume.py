"""Kill `persrm synth` with SIGKILL midway, rerun it: outputs identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openai_server import FakeOpenAIServer  # noqa: E402

from data_synth.pipeline import OUTPUT_FILES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cmd(out: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "data_synth.cli", "--input", "demo", "--output_dir", str(out),
            "--teacher.backend", "openai", "--teacher.base_url", base_url, "--teacher.model", "fake-teacher",
            "--teacher.concurrency", "3", "--teacher.timeout", "0.5", "--teacher.backoff", "0.02",
            "--corpus.max_authors", "6", "--corpus.max_paragraphs_per_author", "10", "--progress", "false"]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_midway_then_rerun_gives_identical_outputs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with FakeOpenAIServer(latency=0.02, fail_rate=0.1, slow_rate=0.03, slow_seconds=1.0, malformed_rate=0.05) as srv:
        full, killed = tmp_path / "full", tmp_path / "killed"
        subprocess.run(_cmd(full, srv.base_url), check=True, cwd=REPO, env=env, capture_output=True)
        total = _lines(full / ".work/results.jsonl")
        assert total > 20

        proc = subprocess.Popen(_cmd(killed, srv.base_url), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = killed / ".work/results.jsonl"
        deadline = time.time() + 60
        while _lines(log) < total // 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_at_kill = _lines(log)
        assert 0 < done_at_kill < total, "the run was not interrupted midway"
        assert not (killed / "manifest.json").exists()
        with open(log, "ab") as fh:  # as if the kill had landed in the middle of a write
            fh.write(b'{"id": "torn')

        subprocess.run(_cmd(killed, srv.base_url), check=True, cwd=REPO, env=env, capture_output=True)

    assert _lines(log) == total  # no duplicate, no lost task
    for name in OUTPUT_FILES:
        assert (killed / name).read_bytes() == (full / name).read_bytes(), f"{name} differs"
