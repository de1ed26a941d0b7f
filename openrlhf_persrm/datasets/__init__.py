"""Dataset plugins: PersRM pair JSONL -> rows OpenRLHF's own dataset classes read.

``persrm_sft`` (:mod:`.sft`) feeds ``SFTDataset`` for stage 1; ``persrm_rl`` (:mod:`.rl`)
feeds ``PromptDataset`` for stage 2 with labels for the ``persrm_rule`` reward.
"""
