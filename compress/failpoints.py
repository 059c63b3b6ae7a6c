"""Fail points: make a run die or pause at a named moment, for the tests of interrupted runs.

Off unless the environment variable ``COMPRESS_FAILPOINT`` is set (nothing is
read, patched or slowed otherwise). Its value is ``ACTION@POINT[,ACTION@POINT...]``:

- ``ACTION``: ``kill`` (SIGKILL this process: no cleanup, no ``finally``, as a
  power cut or the OOM killer would) or ``pause`` (sleep until a signal arrives,
  so a test can send SIGINT or start a second run at a known moment);
- ``POINT``: ``write:<file name>``: inside an atomic write of that file, after its
  temporary file is complete and before it is renamed into place; or
  ``log:<text>``: when the run logs a message that contains ``<text>``.

Example: ``COMPRESS_FAILPOINT="kill@write:01-prune.pt"``.

Only the standard library is imported here, so any module may call ``hit``.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

ENV = "COMPRESS_FAILPOINT"
ACTIONS = ("kill", "pause")


def points() -> list[tuple[str, str]]:
    """The ``(action, point)`` pairs that ``COMPRESS_FAILPOINT`` asks for (empty when unset)."""
    spec = os.environ.get(ENV, "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, sep, point = item.partition("@")
        if not sep or action not in ACTIONS or not point:
            raise ValueError(f"{ENV}: expected ACTION@POINT with ACTION in {ACTIONS}, got {item!r}")
        out.append((action, point))
    return out


def hit(point: str) -> None:
    """Act if ``point`` (e.g. ``write:model.dcz``) is armed; a no-op when ``COMPRESS_FAILPOINT`` is unset."""
    if ENV not in os.environ:
        return
    for action, armed in points():
        if armed == point:
            fire(action, point)


def hit_message(message: str) -> None:
    """Act on every armed ``log:<text>`` point whose text occurs in ``message``."""
    for action, armed in points():
        if armed.startswith("log:") and armed[4:] in message:
            fire(action, armed)


def fire(action: str, point: str) -> None:
    print(f"failpoint: {action} at {point}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # pause: a signal's handler (SIGINT -> KeyboardInterrupt) ends the sleep
        time.sleep(3600)


class LogTrigger(logging.Handler):
    """A log handler that fires the ``log:`` fail points; installed only when some are armed."""

    def emit(self, record: logging.LogRecord) -> None:
        hit_message(record.getMessage())


def install(log: logging.Logger) -> None:
    """Arm the ``log:`` points on ``log`` (call after its other handlers, so the message is written first)."""
    if ENV in os.environ and any(p.startswith("log:") for _, p in points()):
        log.addHandler(LogTrigger())
