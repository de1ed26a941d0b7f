"""Reward plugins. ``persrm_rule`` is the stage-2 verifiable reward (:mod:`.rule`); ``persrm`` is a
trained PersRM as the generative reward of policy RLHF (:mod:`.persrm`);
:mod:`.openrlhf_entry` is the file OpenRLHF loads as ``--reward.remote_url``."""
