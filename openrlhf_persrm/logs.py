"""Console logging for the project's commands (``persrm``, ``persrm synth``, ``persrm eval``, the wrappers).

The project's own records print under its prefix (``[persrm] message``); every other library's
record prints under that library's logger name (``WARNING bitsandbytes.backends.cpu.ops: ...``), so
a third-party warning never reads like a project error. Other libraries speak at WARNING and above
unless the command asks for DEBUG.

Only commands call :func:`setup_logging`; importing the package configures nothing. Like
:func:`logging.basicConfig`, it leaves a root logger that something else (an application, pytest)
has already given handlers alone.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

#: Top-level package names whose loggers are the project's own. ``__main__`` is the module a
#: ``python -m openrlhf_persrm....`` command runs.
PROJECT_LOGGERS: tuple[str, ...] = ("openrlhf_persrm", "data_synth", "__main__")


def is_project_logger(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_LOGGERS


class ConsoleFormatter(logging.Formatter):
    """``[prefix] message`` for the project's records, ``LEVEL logger.name: message`` for the rest."""

    def __init__(self, prefix: str = "persrm"):
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if is_project_logger(record.name):
            return f"[{self.prefix}] {text}"
        return f"{record.levelname} {record.name}: {text}"


class _LevelFilter(logging.Filter):
    def __init__(self, project_level: int, other_level: int):
        super().__init__()
        self.project_level, self.other_level = project_level, other_level

    def filter(self, record: logging.LogRecord) -> bool:
        floor = self.project_level if is_project_logger(record.name) else self.other_level
        return record.levelno >= floor


class ConsoleHandler(logging.StreamHandler):
    """The handler :func:`setup_logging` installs on the root logger (found again by its type)."""


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).upper())
    if not isinstance(value, int):
        raise ValueError(f"--log_level {level!r}: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return value


def setup_logging(prefix: str = "persrm", level: int | str = logging.INFO, *,
                  stream: TextIO | None = None) -> logging.Handler | None:
    """Install (or retune) the console handler; returns it, or None when the root logger has
    handlers of someone else's.

    A second call (``persrm`` then its ``eval`` subcommand) changes the prefix and level of the
    handler the first call installed instead of adding another.
    """
    project_level = _level(level)
    other_level = project_level if project_level <= logging.DEBUG else max(project_level, logging.WARNING)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, ConsoleHandler)]
    if ours:
        handler = ours[0]
    elif root.handlers:
        return None
    else:
        handler = ConsoleHandler(sys.stderr if stream is None else stream)
        root.addHandler(handler)
    if stream is not None:
        handler.setStream(stream)
    handler.setFormatter(ConsoleFormatter(prefix))
    for f in list(handler.filters):
        handler.removeFilter(f)
    handler.addFilter(_LevelFilter(project_level, other_level))
    root.setLevel(project_level)
    return handler
