import subprocess
import sys


def test_import_is_cheap():
    code = ("import sys, openrlhf_persrm, openrlhf_persrm.pairs, openrlhf_persrm.judge_format, "
            "openrlhf_persrm.registry, openrlhf_persrm.contracts, openrlhf_persrm.rewards.rule, "
            "openrlhf_persrm.datasets.sft, openrlhf_persrm.datasets.rl; "
            "heavy = [m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers', 'openrlhf') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import openrlhf_persrm pulled in: {out.stdout.strip()}"
