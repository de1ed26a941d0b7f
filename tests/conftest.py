"""Shared fixtures. Tests run with ``--import-mode=importlib`` (the openrlhf wheel installs a
top-level ``tests`` package), so this folder is put on ``sys.path`` for helper modules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def make_pair(i: int = 0, **overrides) -> dict:
    row = {
        "id": f"pair-{i}",
        "author": "jane_austen" if i % 2 == 0 else "herman_melville",
        "exemplars": [
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.",
            "She was the youngest of the two daughters of a most affectionate, indulgent father.",
        ],
        "prompt": "The morning was fine, and Elinor walked out early.",
        "chosen": "She had not gone far before she perceived, with no small degree of vexation, that she was observed.",
        "rejected": "She had not gone far before she noticed, with no little degree of annoyance, that she was watched.",
        "negative_type": "minor_replacement",
    }
    row.update(overrides)
    return row


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from _tiny import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_rows(tmp_path / "pairs.jsonl", [make_pair(i) for i in range(6)])


@pytest.fixture
def sft_file(tmp_path) -> Path:
    rows = []
    for i in range(16):
        pos = "A" if i % 2 == 0 else "B"
        rows.append(make_pair(i, trace={
            "reasoning": "The exemplars are measured and ironic, with long periodic sentences. "
                         "The real continuation keeps that register; the other swaps in plainer words.",
            "chosen_position": pos, "scores": [8, 4] if pos == "A" else [4, 8], "source": "test"}))
    return write_rows(tmp_path / "sft.jsonl", rows)


def judge_prompts(n_pairs: int) -> list:
    """Judge-format prompts for the first ``n_pairs`` test pairs, in both A/B orders, plus one with
    random-word candidates per pair."""
    from openrlhf_persrm.judge_format import arrange, build_messages

    import random

    rng = random.Random(0)
    words = "the a sea of letter morning and I was it light grey".split()
    out = []
    for i in range(n_pairs):
        p = make_pair(i)
        for pos in ("A", "B"):
            out.append(build_messages(p["exemplars"], p["prompt"], *arrange(p["chosen"], p["rejected"], pos)))
        # Candidates of random words too (a policy's samples look like that), so the judge's
        # output format does not hinge on seeing these particular texts.
        noise = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(2)]
        out.append(build_messages(p["exemplars"], p["prompt"], *noise))
    return out


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory) -> str:
    """A tiny model taught to answer judge prompts in the judge format (mixed verdicts)."""
    from _tiny import tiny_judge_lm

    return tiny_judge_lm(tmp_path_factory.mktemp("judge"), judge_prompts(4), steps=200)


def tiny_grpo_cmd(tmp_path: Path, model: str, prompts: Path, *flags: str) -> list[str]:
    """``train_ppo_ray --cpu`` for two small GRPO steps (4 prompts x 4 samples); ``flags`` add or override."""
    import sys

    return [sys.executable, "-m", "openrlhf_persrm.cli.train_ppo_ray", "--cpu",
            "--data.prompt_dataset", str(prompts), "--actor.model_name_or_path", model,
            "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
            "--rollout.batch_size", "2", "--rollout.micro_batch_size", "4", "--train.batch_size", "8",
            "--train.micro_batch_size", "4", "--rollout.max_new_tokens", "16", "--data.max_len", "2048",
            "--vllm.num_engines", "1", "--data.max_samples", "4", "--algo.kl.init_coef", "0",
            "--ckpt.output_dir", str(tmp_path / "ckpt"), "--persrm.cache_dir", str(tmp_path / "cache"), *flags]


#: Seconds one launcher run may take before its test fails (a warm run of the tiny GRPO command takes
#: about 40 s on one core; the first run of a session also JIT-builds DeepSpeed's CPU ops, 2-3 min).
LAUNCHER_TIMEOUT_S = 480.0

_SPAWNED: list = []  # children started by spawn() in the running test; their trees are killed at teardown


def spawn(cmd: list[str], cwd: Path, log: Path, **env: str):
    """Start ``cmd`` in its own session (so its whole tree, Ray included, can be killed by process
    group), its stdout and stderr going to ``log``: a file, never a pipe nobody reads (a full pipe
    blocks the child's next write, and a server blocked in a log write answers nobody)."""
    import subprocess

    full_env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), **env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=full_env, start_new_session=True)
    _SPAWNED.append(proc)
    return proc


def log_tail(log: Path, lines: int = 60) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def process_tree(proc) -> list:
    """The live processes of ``proc``'s session (``spawn`` makes it a session leader; its descendants,
    Ray's included, stay in that session even when they change process group)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid and (p.pid != proc.pid or proc.returncode is None):
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def kill_tree(proc) -> None:
    """SIGKILL every process of ``proc``'s session, by PID and process group; reaps ``proc``."""
    import signal

    import psutil

    if proc.poll() is None:  # the leader is not reaped, so its group id cannot have been reused
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    for _ in range(3):  # a Ray process may start another while we kill: look again
        tree = process_tree(proc)
        if not tree:
            break
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=10)
    try:
        proc.wait(10)
    except Exception:  # noqa: BLE001 -- unkillable (D state): nothing more to do from here
        pass


def python_stacks(proc, limit: int = 12) -> str:
    """Every thread's Python stack in ``proc``'s tree (``py-spy dump``), to show where a hung run waits."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return "(no stacks: install py-spy to get them)"
    out = []
    for p in process_tree(proc)[:limit]:
        try:
            if "python" not in p.name() and not p.name().startswith("ray::"):
                continue
            dump = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True, timeout=20)
            out.append(f"--- pid {p.pid} {' '.join(p.cmdline()[:4])[:160]}\n{dump.stdout[-4000:]}{dump.stderr[-500:]}")
        except Exception as exc:  # noqa: BLE001 -- best effort, the failure message matters more
            out.append(f"--- pid {p.pid}: no stack ({type(exc).__name__}: {exc})")
    return "\n".join(out)


def stale_build_locks() -> list[Path]:
    """Lock files of DeepSpeed JIT builds: one left by a killed build makes every later build wait forever."""
    return sorted((REPO / ".cache" / "torch_extensions").rglob("lock"))


def wait_or_fail(proc, log: Path, timeout: float, what: str) -> int:
    """``proc``'s exit status; past ``timeout`` the test fails with the log's last lines and the tree's
    Python stacks, and the whole tree is killed (a hang is a failure with a message, never a stuck run)."""
    import subprocess

    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stacks = python_stacks(proc)
        kill_tree(proc)
        locks = stale_build_locks()
        for lock in locks:  # left by the build just killed: the next run would wait on it forever
            lock.unlink(missing_ok=True)
        pytest.fail(f"{what} did not finish within {timeout:.0f} s; killed its process tree.\n"
                    f"Build locks removed: {[str(p) for p in locks] or 'none'}\n"
                    f"--- last lines of {log}:\n{log_tail(log)}\n--- Python stacks:\n{stacks}", pytrace=False)


def run_cpu_launcher(cmd: list[str], cwd: Path, *, timeout: float = LAUNCHER_TIMEOUT_S, **env: str):
    """Run a wrapper command to completion; returns ``(returncode, stdout + stderr)``. Past ``timeout``
    the test fails with the run's last log lines (see :func:`wait_or_fail`)."""
    log = Path(cwd) / f"launcher-{len(_SPAWNED)}.log"
    proc = spawn(cmd, Path(cwd), log, **env)
    rc = wait_or_fail(proc, log, timeout, " ".join(Path(c).name for c in cmd[:3]))
    return rc, log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(autouse=True)
def _no_orphans():
    """Whatever a test spawned is gone when it ends, passed or failed (Ray's processes included)."""
    yield
    while _SPAWNED:
        kill_tree(_SPAWNED.pop())
