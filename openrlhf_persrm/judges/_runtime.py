"""What both judge backends share: they pickle without their runtime (Ray ships them to workers)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, ClassVar


class RebuiltAfterPickling:
    """Mixin: pickle a backend's settings, not its runtime; the runtime is rebuilt on first use.

    ``_RUNTIME`` names the attribute holding the loaded model or client; the lock and the
    ``stats`` counters are per process too.
    """

    _RUNTIME: ClassVar[str]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update({self._RUNTIME: None, "_lock": None, "stats": Counter()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
