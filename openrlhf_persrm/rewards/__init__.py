"""Reward plugins. ``persrm_rule`` is the stage-2 verifiable reward (:mod:`.rule`);
:mod:`.openrlhf_entry` is the file OpenRLHF loads as ``--reward.remote_url``."""
