"""openrlhf-persrm: PersRM-R1 personalised reasoning reward models for OpenRLHF 0.11.2.

Importing this package is cheap on purpose: it never imports torch, Ray, vLLM or
DeepSpeed. Those are imported by the launcher wrappers and model code when they run.
"""

__version__ = "0.1.0"

#: The OpenRLHF release the compatibility layer (``openrlhf_persrm.compat``) is written for.
OPENRLHF_VERSION = "0.11.2"

__all__ = ["__version__", "OPENRLHF_VERSION"]
