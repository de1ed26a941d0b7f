"""Console logging: the project's records under `[persrm]`, other libraries' under their own names.

Seen on every command: bitsandbytes' "Failed to load CPU gemm_4bit_forward ..." printed as
`[persrm] Failed to load ...`, which reads like a project error.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from openrlhf_persrm.logs import ConsoleFormatter, is_project_logger

REPO = Path(__file__).resolve().parents[1]
BNB = "bitsandbytes.backends.cpu.ops"
BNB_MSG = "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels"


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_formatter_prefixes_only_the_projects_records():
    fmt = ConsoleFormatter("persrm eval")
    assert fmt.format(_record("openrlhf_persrm.eval.run", logging.INFO, "hi")) == "[persrm eval] hi"
    assert fmt.format(_record("data_synth.pipeline", logging.WARNING, "w")) == "[persrm eval] w"
    assert fmt.format(_record(BNB, logging.WARNING, BNB_MSG)) == f"WARNING {BNB}: {BNB_MSG}"
    assert not is_project_logger("openrlhf_persrm_extra") and not is_project_logger("root")


# A real command (`persrm eval ...` through the `persrm` entry point) sets logging up; then records
# arrive from a third-party logger, a noisy third-party INFO, and the project's own loggers.
_SCRIPT = f"""
import logging, sys
from openrlhf_persrm.cli.main import main
rc = main(sys.argv[1:])
logging.getLogger({BNB!r}).warning({BNB_MSG!r})
logging.getLogger("httpx").info("HTTP Request: POST http://x 200")
logging.getLogger("openrlhf_persrm.eval.run").info("project info")
logging.getLogger("data_synth.pipeline").warning("project warning")
sys.exit(rc)
"""


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SCRIPT, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_other_libraries_warnings_are_not_under_the_project_prefix(tmp_path):
    from conftest import make_pair, write_rows

    pairs = write_rows(tmp_path / "p.jsonl", [make_pair(i) for i in range(4)])
    done = _run("eval", "--pairs", str(pairs), "--judge", "length", "--out", str(tmp_path / "o"),
                "--bootstrap", "200")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert f"WARNING {BNB}: {BNB_MSG}" in lines
    assert not any("[persrm" in line and "gemm_4bit_forward" in line for line in lines)
    assert "[persrm eval] project info" in lines and "[persrm eval] project warning" in lines
    assert not any("HTTP Request" in line for line in lines)  # other libraries' INFO stays quiet


def test_synth_log_level_still_applies_through_persrm(tmp_path):
    done = _run("synth", "--input", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"))
    assert done.returncode == 2 and "file not found" in done.stderr
    lines = done.stderr.splitlines()
    # --log_level defaults to WARNING for synth: the project's INFO is off, its warnings and others' are on.
    assert "[persrm synth] project warning" in lines and f"WARNING {BNB}: {BNB_MSG}" in lines
    assert "[persrm synth] project info" not in lines


def test_setup_logging_leaves_a_configured_root_alone():
    code = ("import io, logging, sys; h = logging.StreamHandler(sys.stdout); logging.getLogger().addHandler(h); "
            "from openrlhf_persrm.logs import setup_logging; print(setup_logging() is None, "
            "logging.getLogger().handlers == [h])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_second_call_retunes_the_same_handler():
    code = ("import io, logging; from openrlhf_persrm.logs import setup_logging; s = io.StringIO(); "
            "a = setup_logging('persrm', stream=s); b = setup_logging('persrm eval', 'WARNING'); "
            "logging.getLogger('openrlhf_persrm.x').info('quiet'); logging.getLogger('openrlhf_persrm.x').warning('w'); "
            "print(a is b, len(logging.getLogger().handlers), repr(s.getvalue()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True 1 '[persrm eval] w\\n'"
