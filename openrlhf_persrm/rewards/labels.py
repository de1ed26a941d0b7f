"""Labels and responses as OpenRLHF hands them to reward functions. Pure functions."""

from __future__ import annotations

import json
from typing import Any


class LabelError(ValueError):
    """A row's label does not say where the real text was shown."""


def label_object(label: Any, expected: str) -> dict[str, Any]:
    """A label as a dict: a dict as is, or the JSON object in a string; else :class:`LabelError`."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            raise LabelError(f"label {label[:60]!r} is not a JSON object") from None
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
    ``prompt``; where decoding changed the prompt's text, the response is still taken from
    ``len(prompt)`` on, as OpenRLHF documents.
    """
    if prompt and query.startswith(prompt):
        return query[len(prompt):]
    return query[len(prompt):] if len(query) > len(prompt) else query
