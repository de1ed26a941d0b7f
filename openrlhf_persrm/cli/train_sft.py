"""``python -m openrlhf_persrm.cli.train_sft``: OpenRLHF's ``train_sft`` with PersRM plugins.

Stage 1 of PersRM-R1 (SFT on reasoning traces)::

    python -m openrlhf_persrm.cli.train_sft --dataset_plugin persrm_sft \\
        --data.dataset sft.jsonl --model.model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --ckpt.output_dir ckpt/persrm-sft  [any other OpenRLHF train_sft flag]

Run it under ``deepspeed`` / ``torchrun`` for several GPUs exactly as you would run
``openrlhf.cli.train_sft``. With ``--cpu`` (or no GPU visible) it runs on DeepSpeed's CPU
accelerator.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from ._wrapper import (Argv, WrapperError, check_reparse, convert_datasets, load_json_config, logger,
                       namespace_dict, plugin_parser, prepare_trainer_plugins, wrapper_main)

LAUNCHER = "train_sft"


def prepare(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Translate plugin flags; returns OpenRLHF's argv and whether to run on CPU."""
    from .. import compat

    ours, rest = plugin_parser(LAUNCHER, reward=False).parse_known_args(list(argv))
    from ..cpu.mode import choose_cpu

    cpu = choose_cpu(LAUNCHER, cpu=ours.cpu, gpu=ours.gpu, uses_ray=False)
    parser = compat.launcher_parser(LAUNCHER)
    ns = namespace_dict(parser, rest)
    out = Argv(list(rest))
    if ours.dataset_plugin:
        convert_datasets(ours.dataset_plugin, load_json_config(ours.dataset_plugin_config, "--dataset_plugin_config"),
                         "sft", ns, out, ["--data.dataset", "--eval.dataset"],
                         ns.get("model.model_name_or_path"), ours.cache_dir)
    elif ours.dataset_plugin_config:
        raise WrapperError("--dataset_plugin_config needs --dataset_plugin")
    trainer_env, _ = prepare_trainer_plugins(ours.trainer_plugin, ours.trainer_plugin_config, "sft", ns)
    if cpu:
        from ..cpu.mode import cpu_attention

        cpu_attention(ns, out)
    check_reparse(parser, out)
    # The training loop runs in this process (each rank of a deepspeed/torchrun launch runs this wrapper).
    from ..trainers.hooks import ENV_CONFIG, ENV_PLUGINS

    for key in (ENV_PLUGINS, ENV_CONFIG):
        os.environ.pop(key, None)
    os.environ.update(trainer_env)
    return out.tokens, cpu


def run(prepared: tuple[list[str], bool]) -> int:
    from .. import compat

    tokens, cpu = prepared
    if cpu:
        compat.apply_cpu_shims()
        compat.ensure_single_process_env()
    if os.environ.get("PERSRM_TRAINER_PLUGIN"):
        compat.install_trainer_hooks(LAUNCHER)
    compat.run_launcher(LAUNCHER, tokens)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return wrapper_main(LAUNCHER, argv, reward=False, prepare=prepare, run=run)


if __name__ == "__main__":
    sys.exit(main())
