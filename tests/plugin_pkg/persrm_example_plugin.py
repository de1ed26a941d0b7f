"""An example third-party openrlhf-persrm plugin package (reward, dataset and trainer plugin)."""

from dataclasses import dataclass

from openrlhf_persrm.contracts import DatasetFlags, RewardOutput, StepResult, TrainerPlugin
from openrlhf_persrm.pairs import read_pairs, write_jsonl


@dataclass
class LengthReward:
    """Rewards responses close to ``target_words`` words: 1 at the target, falling linearly."""

    name = "example_length"
    target_words: int = 50

    def __call__(self, queries, prompts, labels, **kwargs):
        rewards = []
        for q, p in zip(queries, prompts):
            n = len(q[len(p):].split())
            rewards.append(max(-1.0, 1.0 - abs(n - self.target_words) / self.target_words))
        return RewardOutput(rewards, [(r + 1) / 2 for r in rewards], {"words": [float(len(q.split())) for q in queries]})


@dataclass
class PlainSFT:
    """Pairs -> plain prompt/chosen SFT rows (imitate the person directly, no judging)."""

    name = "example_plain_sft"
    stage = "sft"
    flags = DatasetFlags(input_key="prompt", output_key="chosen", apply_chat_template=True)

    def convert(self, src, dst, *, tokenizer=None, max_len=None):
        return write_jsonl(dst, ({"prompt": r.prompt, "chosen": r.chosen} for r in read_pairs(src)))


@dataclass
class ShortBonus(TrainerPlugin):
    """A trainer plugin: in each prompt group, the shortest response gets ``bonus`` added to its reward;
    logs how many groups the step had (``example_groups``)."""

    name = "example_short_bonus"
    stages = ("rl",)
    bonus: float = 0.0

    def on_rollout_step(self, *, step):
        rewards = list(step.rewards)
        for group in step.groups():
            shortest = min(group, key=lambda i: len(step.samples[i].response))
            rewards[shortest] += self.bonus
        return StepResult(rewards, {"example_groups": float(len(step.groups()))})
