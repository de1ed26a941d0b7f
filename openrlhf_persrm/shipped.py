"""The judge shipped with the package: a LoRA adapter made by a study recipe, with its provenance.

    python -m openrlhf_persrm.shipped RUN_DIR DEST_DIR

copies the stage-1 adapter of a ``persrm pipeline`` run (``RUN_DIR/sft``: ``adapter_config.json``,
``adapter_model.safetensors``, ``persrm_judge.json``) to ``DEST_DIR``, with the base model named by its
built-in alias (so the adapter merges into the SmolLM2 the demo installs, wherever it lives), the weights in
float16, and a provenance record in the card: the recipe, the hashes of the corpus and of the training data,
the code version and the stage's manifest entry. ``openrlhf_persrm.models.resolve_model(DEST_DIR)`` merges it
into a full checkpoint in the model cache on first use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The judge the demo uses: made by recipes/smollm2-cpu-evidence.yaml.
SHIPPED_JUDGE = Path(__file__).parent / "data" / "judges" / "smollm2-135m-evidence"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit(folder: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def package_adapter(run_dir: str | Path, dest: str | Path, *, base_alias: str = "smollm2-135m-instruct") -> dict:
    """Copy a run's stage-1 adapter to ``dest`` with its provenance; returns the card written."""
    import torch
    from safetensors.torch import load_file, save_file

    from .models import JUDGE_CARD, read_judge_card

    run, dest = Path(run_dir), Path(dest)
    sft = run / "sft"
    if not (sft / "adapter_config.json").is_file():
        raise ValueError(f"{sft} holds no LoRA adapter (adapter_config.json); ship a recipe with ds.lora.rank > 0")
    card = read_judge_card(sft)
    if card is None:
        raise ValueError(f"{sft} has no {JUDGE_CARD}: was it trained by `persrm pipeline`?")
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    data = json.loads((run / "data" / "manifest.json").read_text(encoding="utf-8"))
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((sft / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_alias
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(sft / "adapter_model.safetensors")).items()}
    save_file(weights, str(dest / "adapter_model.safetensors"))
    stage = manifest["stages"]["sft"]
    card = dict(card, provenance={
        "recipe": manifest["recipe"]["name"], "recipe_settings": {"synth": manifest["recipe"]["synth"],
                                                                  "sft": manifest["recipe"]["sft"]},
        "corpus_sha256": data["input"]["sha256"],
        "training_data_sha256": {name: data["outputs"][name]["sha256"] for name in ("sft.jsonl", "pairs.jsonl")},
        # every author of the unseen split (the synth manifest's record; some may have made no test pair)
        "held_out_authors": sorted(data.get("splits", {}).get("unseen_authors")
                                   or _held_out(run / "data" / "pairs.jsonl")),
        "code_commit": _git_commit(Path(__file__).parent), "stage_seconds": stage.get("seconds"),
        "weights": "LoRA adapter of stage 1 (SFT on reader traces), float16",
    })
    (dest / JUDGE_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (sft / extra).is_file():
            shutil.copyfile(sft / extra, dest / extra)
    return card


def _held_out(pairs: Path) -> set[str]:
    out = set()
    with open(pairs, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("split") == "test_unseen_authors":
                out.add(row["author"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    card = package_adapter(args[0], args[1])
    print(json.dumps(card["provenance"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
