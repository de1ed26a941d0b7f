"""The judge settings: one type for every component that judges with PersRM.

The ``persrm`` reward (:class:`~openrlhf_persrm.rewards.persrm.PersRMReward`), the ``persrm_group``
trainer plugin (:class:`~openrlhf_persrm.trainers.group.PersRMGroup`) and ``persrm serve``
(``--reward.<field>``) all take exactly these fields, with these defaults, documented here once
(STYLE principle 12: the reward and the group plugin extend :class:`JudgeSettings`, as TRL's
``GRPOConfig`` extends ``TrainingArguments``). The README's table of judge settings is
:func:`settings_table`'s output (``python -m openrlhf_persrm.judge_settings``); a test keeps the two equal.

Every check runs in ``__post_init__``, where the launcher wrapper builds the plugin, so a bad
setting stops the run before any Ray worker starts, with a ``ValueError`` that names the field,
the bad value and the fix.

Cheap to import (nothing heavy at module level): the wrappers and ``persrm serve --help`` read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["JudgeSettings", "MODES", "JUDGE_SOURCES", "get_reward_urls", "setting", "settings_table"]

MODES = ("score_diff", "win_rate", "pointwise")
#: Where the judge is: exactly one of these is set.
JUDGE_SOURCES = ("endpoint", "model", "serve_url", "backend")
ENV_BASE_URL = "PERSRM_JUDGE_BASE_URL"  # the openai backend's fallback for a missing base_url


class _Unset(float):
    """The default ``failure_reward`` (-1.0, a float like any other) that ``__post_init__`` can tell
    apart from a value the user gave, so that giving both ``failure_reward`` and its former name
    ``neutral_reward`` is refused even when the given value equals the default."""


_DEFAULT_FAILURE_REWARD = _Unset(-1.0)


def setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (``metadata["help"]``: flags, README table)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class JudgeSettings:
    """Where the judge is, how it judges, and what happens when it fails (see the module docstring;
    each field's ``metadata["help"]`` is its documentation)."""

    name: ClassVar[str] = "judge settings"
    #: Settings that keep their meaning with ``serve_url``; the others belong to the server, which
    #: does the judging, and are refused (a component that acts on more of them extends this set).
    CLIENT_SIDE: ClassVar[frozenset[str]] = frozenset({"serve_url", "probe_on_start"})

    # ------------------------------------------------------------------ where the judge is
    endpoint: str = setting("", "OpenAI-compatible server with the judge (`vllm serve` of a trained PersRM), e.g. "
                                 "http://127.0.0.1:8000; selects the `openai` backend")
    served_model: str = setting("", "the judge's model name on that server (empty: the first it lists)")
    api_key_env: str = setting("PERSRM_JUDGE_API_KEY", "environment variable holding that server's API key")
    api_key_file: str = setting("", "file holding that server's API key instead (keys never sit in configs or argv)")
    model: str = setting("", "local judge checkpoint folder (or `smollm2-135m-instruct`): the `local` backend, "
                              "in this process on CPU, batched")
    serve_url: str = setting("", "a running `persrm serve` (comma-separated for several): the judging happens "
                                  "there, so judging settings belong to the server and are refused here")
    backend: Any = setting("", "judge backend name, pkg.mod:Class or file.py[:Class], or an instance "
                                "(instead of endpoint/model)")
    backend_config: dict = setting({}, "JSON object of backend keyword arguments (over those derived from the "
                                        "settings above)")
    # ------------------------------------------------------------------ how it judges
    mode: str = setting("score_diff", "how a judgment counts, in [-1, 1]: score_diff (s - r) / 9, win_rate +1/0/-1, "
                                       "pointwise (s - 5.5) / 4.5; r is the reference (persrm) or the other "
                                       "sample (persrm_group)")
    votes: int = setting(1, "judgments per A/B order (test-time voting); above 1 needs temperature > 0")
    temperature: float = setting(0.0, "judge sampling temperature (0: greedy)")
    max_new_tokens: int = setting(512, "tokens the judge may write (reasoning and answer)")
    max_response_chars: int = setting(4000, "each candidate is cut to this many characters (counted in "
                                             "candidate_truncated)")
    max_response_tokens: int = setting(1024, "... and to this many judge tokens (emoji and rare scripts take "
                                              "several tokens a character)")
    max_prompt_tokens: int = setting(4096, "judge prompt budget; exemplars are dropped to fit, a prompt that "
                                            "cannot fit scores failure_reward")
    chars_per_token: float = setting(3.0, "ASCII characters per token where the judge cannot count tokens (other "
                                           "characters: one token per UTF-8 byte)")
    parse_retries: int = setting(1, "extra attempts, sampled at retry_temperature, for unreadable judgments, "
                                     "within the deadline")
    retry_temperature: float = setting(0.7, "temperature of those attempts (at least temperature)")
    require_reasoning: bool = setting(True, "demand <think>...</think> before the answer")
    seed: int = setting(0, "base seed of the judge's sampling (vote i uses seed + i)")
    # ------------------------------------------------------------------ evidence
    evidence: str = setting("auto", "show the judge measured evidence on both candidates (exemplar gain, fluency, "
                                     "style, copying; openrlhf_persrm.evidence), computed within the deadline: auto "
                                     "(when the judge checkpoint's persrm_judge.json says it was trained with "
                                     "evidence, or a scorer is set), on, off (plain PersRM-R1 judging)")
    scorer_model: str = setting("", "the frozen scorer model the evidence is measured with, a local checkpoint "
                                     "(default: the one recorded with the judge, the model it was trained from)")
    scorer_endpoint: str = setting("", "... or an OpenAI-compatible completions server with it (`vllm serve`: "
                                        "prompt log-probabilities), e.g. http://127.0.0.1:8001")
    scorer_served_model: str = setting("", "the scorer's model name on that server")
    scorer_batch_size: int = setting(8, "local scorer: sequences per forward pass")
    # ------------------------------------------------------------------ when it fails
    failure_reward: float = setting(_DEFAULT_FAILURE_REWARD,
                                     "reward of a sample the judge could not score (judge error, deadline, "
                                     "unreadable output, bad label or input); -1, the worst judged reward, so "
                                     "failing never pays more than losing")
    neutral_reward: float | None = setting(None, "former name of failure_reward (give one of the two)")
    deadline_s: float = setting(90.0, "a reward call (persrm), a step's judging (persrm_group) or a /get_reward "
                                       "answer (persrm serve) returns within this many seconds; unfinished "
                                       "judgments are cancelled and score failure_reward (keep it under "
                                       "OpenRLHF's 180 s client timeout)")
    timeout: float = setting(60.0, "seconds per judge request attempt (the built-in backends)")
    stop_failure_rate: float = setting(0.5, "stop rule: a window of samples fails when more than this share of "
                                             "them got no judgment")
    stop_after_steps: int = setting(3, "stop rule: this many failed windows in a row declare the judge down and "
                                        "end the run, with the cause (0: never)")
    stop_window: int = setting(64, "stop rule: samples per window")
    probe_on_start: bool = setting(True, "judge one probe pair before the first reward (persrm: the entry file; "
                                          "persrm_group: its first step; persrm serve: before serving) and stop, "
                                          "naming the cause, when the judge cannot answer")

    def __post_init__(self) -> None:
        self.check_judge_settings()

    # ------------------------------------------------------------------ the checks
    def _bad(self, key: str, fix: str) -> ValueError:
        return ValueError(f"{self.name}: {key}={getattr(self, key)!r}; {fix}")

    def check_judge_settings(self) -> None:
        """Every check of the fields above; resolves ``neutral_reward`` into ``failure_reward``."""
        who = self.name
        sources = [k for k in JUDGE_SOURCES if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                f"{who}: set exactly one judge source, got {sources or 'none'}: endpoint (a served PersRM, e.g. "
                "'http://127.0.0.1:8000'), model (a local checkpoint), serve_url (a running `persrm serve`) "
                "or backend (a judge backend name)")
        if self.serve_url:
            self._refuse_server_side_settings()
            get_reward_urls(self.serve_url, who)
        if self.mode not in MODES:
            raise self._bad("mode", f"use one of {', '.join(MODES)}")
        if self.votes < 1:
            raise self._bad("votes", "use 1 or more judgments per order")
        if self.votes > 1 and self.temperature <= 0:
            raise ValueError(f"{who}: votes={self.votes} with temperature={self.temperature} repeats one greedy "
                             "judgment; set temperature > 0 (e.g. 0.7) or votes=1")
        for key in ("max_new_tokens", "max_response_chars", "max_response_tokens", "max_prompt_tokens",
                    "stop_window"):
            if getattr(self, key) < 1:
                raise self._bad(key, "use a positive number")
        for key in ("parse_retries", "stop_after_steps"):
            if getattr(self, key) < 0:
                raise self._bad(key, "use 0 or more")
        for key in ("deadline_s", "timeout", "chars_per_token"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise self._bad(key, "use a positive number")
        if not 0 <= self.stop_failure_rate < 1:
            raise self._bad("stop_failure_rate", "use a share in [0, 1)")
        self._resolve_failure_reward()
        if not isinstance(self.backend_config, dict):
            raise self._bad("backend_config", "give a JSON object of backend keyword arguments")
        if self.endpoint:
            from .judges.openai_client import v1_base_url

            try:
                v1_base_url(self.endpoint)
            except ValueError:
                raise self._bad("endpoint", "give the judge server's http(s) URL, e.g. http://127.0.0.1:8000") \
                    from None
        if self.model:
            self._check_checkpoint("model", self.model)
        self._check_builtin_backend()
        self._check_evidence()

    def _check_evidence(self) -> None:
        if self.evidence not in ("auto", "on", "off"):
            raise self._bad("evidence", "use auto, on or off")
        if self.scorer_model and self.scorer_endpoint:
            raise ValueError(f"{self.name}: scorer_model={self.scorer_model!r} and scorer_endpoint="
                             f"{self.scorer_endpoint!r}: give one evidence scorer")
        if self.scorer_endpoint and not self.scorer_served_model:
            raise self._bad("scorer_served_model", "name the scorer model the scorer_endpoint serves")
        if self.scorer_model:
            self._check_checkpoint("scorer_model", self.scorer_model)
        if self.scorer_batch_size < 1:
            raise self._bad("scorer_batch_size", "use a positive number")
        if self.evidence == "on" and not (self.scorer_model or self.scorer_endpoint or self.model or self.serve_url):
            raise ValueError(f"{self.name}: evidence='on' needs a scorer: set scorer_model (a local checkpoint, "
                             "e.g. the model the judge was trained from) or scorer_endpoint")

    def _resolve_failure_reward(self) -> None:
        given_failure = self.failure_reward is not _DEFAULT_FAILURE_REWARD
        if self.neutral_reward is not None:
            if given_failure:
                raise ValueError(f"{self.name}: failure_reward={self.failure_reward!r} and neutral_reward="
                                 f"{self.neutral_reward!r} are one setting (neutral_reward is its former name); "
                                 "give only failure_reward")
            self._check_reward("neutral_reward")
            self.failure_reward, self.neutral_reward = float(self.neutral_reward), None
        self._check_reward("failure_reward")
        self.failure_reward = float(self.failure_reward)

    def _check_reward(self, key: str) -> None:
        value = getattr(self, key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and -1 <= value <= 1):
            raise self._bad(key, "use a number in [-1, 1] (-1, the worst judged reward, keeps failures from "
                                 "paying more than an honest loss)")

    def _check_checkpoint(self, key: str, path: str) -> None:
        from .models import SMOLLM2

        if path.lower() not in (SMOLLM2, "smollm2") and not os.path.exists(path):
            raise ValueError(f"{self.name}: {key}={path!r} is not a local checkpoint folder (nothing is downloaded); "
                             "give the folder of a trained PersRM, or for a served judge set endpoint instead")

    def _check_builtin_backend(self) -> None:
        """``backend`` naming a built-in backend: the settings it cannot start without, checked now rather
        than by every judgment later inside a Ray worker."""
        if self.backend == "local":
            path = self.backend_config.get("model_path")
            if not path:
                raise ValueError(f"{self.name}: backend='local' without a checkpoint; set model=PATH (a local "
                                 "judge checkpoint folder) instead of backend='local', or backend_config="
                                 '{"model_path": PATH}')
            self._check_checkpoint("backend_config.model_path", str(path))
        elif self.backend == "openai":
            if not (self.backend_config.get("base_url") or os.environ.get(ENV_BASE_URL)):
                raise ValueError(f"{self.name}: backend='openai' without a server; set endpoint=URL (e.g. "
                                 "http://127.0.0.1:8000) instead of backend='openai', or backend_config="
                                 f'{{"base_url": URL}}, or ${ENV_BASE_URL}')

    def _refuse_server_side_settings(self) -> None:
        ignored = [f.name for f in dataclasses.fields(JudgeSettings)
                   if f.name not in self.CLIENT_SIDE and getattr(self, f.name) != _default(f)]
        if ignored:
            shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in ignored)
            flags = " ".join(f"--reward.{k} ..." for k in ignored)
            raise ValueError(f"{self.name}: with serve_url the judging happens in `persrm serve`, which would ignore "
                             f"{shown} set here; give them to the server instead (persrm serve {flags}) and keep "
                             f"only {', '.join(sorted(self.CLIENT_SIDE))} in this config")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def get_reward_urls(serve_url: str, who: str = "serve_url") -> list[str]:
    """The ``/get_reward`` URL of each ``persrm serve`` in a comma-separated ``serve_url``.

    >>> get_reward_urls("http://a:8765/, http://b:8765/get_reward")
    ['http://a:8765/get_reward', 'http://b:8765/get_reward']
    """
    from urllib.parse import urlsplit

    urls = []
    for url in (u.strip().rstrip("/") for u in str(serve_url).split(",")):
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{who}: serve_url entry {url!r} is not an http(s) URL; give the server's address, "
                             "e.g. http://127.0.0.1:8765")
        urls.append(url if url.endswith("/get_reward") else url + "/get_reward")
    return urls


def settings_table() -> str:
    """The judge settings as a Markdown table (the README's copy is this function's output)."""
    rows = ["| setting | default | what it does |", "| --- | --- | --- |"]
    for f in dataclasses.fields(JudgeSettings):
        default = _default(f)
        shown = json.dumps(float(default) if isinstance(default, _Unset) else default)
        rows.append(f"| `{f.name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
