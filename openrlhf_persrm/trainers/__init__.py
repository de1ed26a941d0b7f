"""Trainer plugins: hooks into OpenRLHF's training loops (contract: :class:`~openrlhf_persrm.contracts.TrainerPlugin`).

Built-ins, registered in ``openrlhf_persrm.registry.trainer_plugins`` (entry-point group
``openrlhf_persrm.trainers``):

``persrm_group`` (:mod:`.group`)
    policy RLHF: each sample is judged by a PersRM against other samples of its group;
``persrm_order_consistency`` (:mod:`.order_consistency`)
    stage 2: rewards a verdict that agrees with the one given for the pair's other A/B order;
``persrm_eval`` (:mod:`.evaluation`)
    both stages: pairwise accuracy, position consistency and format failures on validation pairs.

:mod:`.hooks` loads plugins and runs their hooks; :mod:`.health` is the always-on GRPO step check.
Every reach into OpenRLHF's trainers is in :mod:`openrlhf_persrm.compat`. Nothing heavy is imported here.
"""
