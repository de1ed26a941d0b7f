"""A trainer plugin for tests: writes every sample's response and reward, as the plugins before it left
them (so as OpenRLHF trains on them), to a JSON-lines file."""

from __future__ import annotations

import json
from dataclasses import dataclass

from openrlhf_persrm.contracts import RolloutStep, TrainerPlugin


@dataclass
class RewardRecorder(TrainerPlugin):
    name = "reward_recorder"
    stages = ("rl",)

    path: str = ""

    def on_rollout_step(self, *, step: RolloutStep) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            for s in step.samples:
                fh.write(json.dumps({"step": step.global_step, "group": s.group, "response": s.response,
                                     "reward": s.reward}) + "\n")
        return None
