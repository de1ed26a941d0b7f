"""CPU stand-ins that let OpenRLHF's own rollout code run without a GPU.

* :mod:`openrlhf_persrm.cpu.engine` -- a continuous-batching transformers generation engine.
* :mod:`openrlhf_persrm.cpu.vllm_standin` -- a ``vllm`` module tree backed by that engine;
  :func:`install` puts it into ``sys.modules`` (call it in the driver and in every Ray worker).

Importing this package is cheap: torch is imported only when an engine is built.
"""

from __future__ import annotations


def install() -> None:
    """Install the stand-in ``vllm`` modules (idempotent); see :func:`vllm_standin.install`."""
    from openrlhf_persrm.cpu import vllm_standin

    vllm_standin.install()


__all__ = ["install"]
