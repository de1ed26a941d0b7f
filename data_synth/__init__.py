"""data_synth: PersRM training and evaluation data from real people's writing.

A library with a CLI (``persrm synth``, see :mod:`data_synth.cli`): read an author corpus,
split it by author, build preference pairs (real continuation vs. a negative), reasoning
traces for stage-1 SFT, and RL rows, with a manifest. Importing this package is cheap: no
torch, no model, no network until a run asks for them.
"""

__all__ = ["run_synth", "SynthConfig"]


def __getattr__(name: str):
    # Lazy: `import data_synth` must not import the pipeline (and its dependencies).
    if name == "run_synth":
        from .pipeline import run_synth
        return run_synth
    if name == "SynthConfig":
        from .config import SynthConfig
        return SynthConfig
    raise AttributeError(name)
