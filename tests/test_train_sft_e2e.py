"""Stage 1 end to end: the wrapper runs OpenRLHF's own train_sft on CPU with persrm_sft rows."""

import json
import sys

import pytest
from conftest import run_cpu_launcher


def _sft_loss(model_path: str, rows: list[dict]) -> float:
    """Mean NLL of the target (trace + answer) given the judge prompt, as SFT optimises it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(row["prompt"] + row["response"], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
            logits = model(ids).logits[0, :-1]
            targets = ids[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[len(p_ids) - 1:]
            total += nll.sum().item()
            count += nll.numel()
    return total / count


@pytest.mark.slow
def test_train_sft_on_cpu_with_dataset_plugin(tmp_path, tiny_model, sft_file):
    out_dir = tmp_path / "ckpt"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "openrlhf_persrm.cli.train_sft", "--cpu",
           "--dataset_plugin", "persrm_sft", "--data.dataset", str(sft_file),
           "--model.model_name_or_path", tiny_model, "--ckpt.output_dir", str(out_dir), "--ckpt.save_hf",
           "--train.micro_batch_size", "2", "--train.batch_size", "4", "--train.max_epochs", "1",
           "--data.max_len", "2048", "--adam.lr", "3e-3", "--lr_warmup_ratio", "0",
           "--logger.logging_steps", "1", "--persrm.cache_dir", str(cache)]
    rc, log = run_cpu_launcher(cmd, tmp_path)
    assert rc == 0, log[-8000:]
    # 16 rows / batch 4 = 4 optimiser steps (>= 3)
    assert "Train step of epoch 0: 100%" in log and "| 8/8 " in log
    assert "running openrlhf.cli.train_sft" in log and "--ds.attn_implementation sdpa" in log

    [rows_path] = [p for p in cache.rglob("*.jsonl")]
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 16
    # The checkpoint reloads with transformers and fits the traces better than the initial weights.
    before, after = _sft_loss(tiny_model, rows), _sft_loss(str(out_dir), rows)
    assert after < before - 0.1, (before, after)
