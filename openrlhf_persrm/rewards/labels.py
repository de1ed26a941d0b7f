"""Labels and responses as OpenRLHF hands them to reward functions. Pure functions."""

from __future__ import annotations

import json
from typing import Any, Sequence

#: End-of-turn markers OpenRLHF leaves at the end of a response (it decodes special tokens).
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<pad>",
               "<|finetune_right_pad_id|>", "<end_of_turn>", "<eos>")


class LabelError(ValueError):
    """A row's label does not say where the real text was shown."""


def label_object(label: Any, expected: str) -> dict[str, Any]:
    """A label as a dict: a dict as is, or the JSON object in a string; else :class:`LabelError`."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except (ValueError, RecursionError) as exc:  # not JSON, an integer past Python's digit limit, too deep
            why = "nested too deeply" if isinstance(exc, RecursionError) else "not a JSON object"
            raise LabelError(f"label {label[:60]!r} is {why}") from None
    if not isinstance(label, dict):
        raise LabelError(f"label must be a dict with {expected}, got {type(label).__name__}")
    return label


def parse_label(label: Any) -> dict[str, Any]:
    """Normalise a reward label to a dict with ``chosen_position`` in {'A', 'B'}.

    Accepted: a dict (as the ``persrm_rl`` dataset plugin writes it), its JSON text, or the
    bare position ``"A"`` / ``"B"``.

    >>> parse_label({"chosen_position": "B", "pair_id": "x"})["chosen_position"]
    'B'
    >>> parse_label("A")
    {'chosen_position': 'A'}
    """
    if isinstance(label, str) and label.strip() in ("A", "B"):
        return {"chosen_position": label.strip()}
    label = label_object(label, "'chosen_position'")
    pos = label.get("chosen_position")
    if pos not in ("A", "B"):
        raise LabelError(f"label field 'chosen_position' must be 'A' or 'B', got {pos!r}")
    return label


def split_response(query: str, prompt: str) -> str:
    """The generated response inside OpenRLHF's ``query`` (prompt + response, decoded).

    OpenRLHF decodes prompt and response tokens together, so ``query`` normally starts with
    ``prompt``. When OpenRLHF left-truncated a prompt that did not fit (``utils/agent.py``),
    ``query`` starts with only the *end* of ``prompt``: the response follows the longest end of
    the prompt that ``query`` starts with (its first characters may differ, where the cut fell
    inside a multi-byte character). Otherwise the response is taken from ``len(prompt)`` on,
    as OpenRLHF documents.
    """
    if prompt and query.startswith(prompt):
        return query[len(prompt):]
    tail = prompt[-64:]
    if tail:
        start = 0
        while (i := query.find(tail, start)) >= 0:
            end = i + len(tail)
            head = query[:end]
            if prompt.endswith(head[min(4, i):]):
                return query[end:]
            start = i + 1
    return query[len(prompt):] if len(query) > len(prompt) else query


def clean_response(text: str, markers: Sequence[str] = END_MARKERS) -> str:
    """The response without trailing end-of-turn markers and whitespace.

    >>> clean_response("Sure thing.<|im_end|><pad><pad>")
    'Sure thing.'
    """
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in markers:
            if marker and text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def has_lone_surrogate(value: Any) -> bool:
    """Whether a string (or any string inside a list/dict, at any depth) cannot be encoded as
    UTF-8 (a lone surrogate from JSON such as ``"\\ud800"``, or raw bytes that are not UTF-8 read
    with ``surrogateescape``): such text is refused per sample, not per batch.

    Iterative, so a label nested deeper than Python's recursion limit is walked too.

    >>> has_lone_surrogate({"exemplars": ["fine", ["deep", "\\udc80"]]}), has_lone_surrogate(["ok"])
    (True, False)
    """
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, (dict, list, tuple)):
            if id(item) in seen:  # a Python caller's cyclic structure
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
    return False
