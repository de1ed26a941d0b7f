"""A toy verifiable reward for the CPU learning check, loaded as a file plugin
(``--reward_plugin benchmarks/toy_rewards.py:ContainsDigit``)."""

from dataclasses import dataclass

from openrlhf_persrm.contracts import RewardOutput


@dataclass
class ContainsDigit:
    """1.0 when the response contains a digit, else 0.0: easy to verify, rare enough at the start."""

    name = "contains_digit"

    def __call__(self, queries, prompts, labels, **kwargs):
        hits = [float(any(ch.isdigit() for ch in q[len(p):])) for q, p in zip(queries, prompts)]
        return RewardOutput(hits, hits, {"hit": hits})
