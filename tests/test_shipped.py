"""The shipped judge: a study run's stage-1 LoRA adapter, packaged with its provenance, merges and judges."""

from __future__ import annotations

import json

from openrlhf_persrm.models import evidence_scorer_of, read_judge_card, resolve_model, write_judge_card
from openrlhf_persrm.shipped import SHIPPED_JUDGE, package_adapter


def _run_with_adapter(tmp_path, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # a trained adapter changes the model
    peft.save_pretrained(run / "sft")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(run / "sft")
    write_judge_card(run / "sft", {"evidence": {"version": 1, "scorer": "smollm2-135m-instruct"}})
    (run / "data").mkdir()
    (run / "data" / "pairs.jsonl").write_text(json.dumps({"author": "x", "split": "test_unseen_authors"}) + "\n")
    (run / "data" / "manifest.json").write_text(json.dumps({
        "input": {"sha256": "c0ffee"}, "outputs": {"sft.jsonl": {"sha256": "aa"}, "pairs.jsonl": {"sha256": "bb"}}}))
    (run / "manifest.json").write_text(json.dumps({"recipe": {"name": "study", "synth": {}, "sft": {"ds.lora.rank": 4}},
                                                   "stages": {"sft": {"seconds": 12.0}}}))
    return run


def test_a_packaged_adapter_carries_its_provenance_and_merges_into_its_base(tmp_path, tiny_model):
    run = _run_with_adapter(tmp_path, tiny_model)
    dest = tmp_path / "shipped"
    card = package_adapter(run, dest, base_alias=tiny_model)
    prov = card["provenance"]
    assert prov["recipe"] == "study" and prov["corpus_sha256"] == "c0ffee" and prov["held_out_authors"] == ["x"]
    assert prov["training_data_sha256"] == {"sft.jsonl": "aa", "pairs.jsonl": "bb"}
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    assert read_judge_card(dest)["evidence"]["scorer"] == "smollm2-135m-instruct"
    merged = resolve_model(str(dest), cache_dir=tmp_path / "cache")
    assert merged != str(dest) and (tmp_path / "cache") in __import__("pathlib").Path(merged).parents
    assert evidence_scorer_of(merged) == "smollm2-135m-instruct"  # the card travels with the merge
    assert resolve_model(str(dest), cache_dir=tmp_path / "cache") == merged  # merged once


def test_the_shipped_judge_is_in_the_package_with_its_card():
    card = read_judge_card(SHIPPED_JUDGE)
    assert card is not None and card["evidence"]["version"] == 1
    assert card["provenance"]["recipe"] == "smollm2-cpu-evidence"
    assert (SHIPPED_JUDGE / "adapter_model.safetensors").stat().st_size < 20 * 2 ** 20
    config = json.loads((SHIPPED_JUDGE / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
