"""The run folder's guard: one run at a time per folder, and no leftovers of runs that were killed.

``RunLock`` holds an exclusive ``flock`` on ``<run>/.lock`` for as long as the run
lives. The kernel drops the lock when the process dies, however it dies (SIGKILL,
OOM killer, power cut of the process), so a lock file whose owner is gone is
recognised without trusting a pid that may have been reused; its stale content
(the dead run's pid) is reported and replaced. A clean exit removes the file.

Atomic writers (``report.write_atomic``, ``models.save_checkpoint``, the ``.dcz``
writer) write ``.<name>.<random>.tmp`` beside their target and rename it into
place; a run killed mid-write leaves such a hidden temporary behind and never a
truncated artifact. ``remove_temporaries`` deletes them once the lock is held.

POSIX only (``fcntl``), like the rest of the run machinery.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from compress.errors import InputError

LOCK_NAME = ".lock"
TEMP_GLOB = ".*.tmp"


class RunLock:
    """Exclusive use of a run folder by this process.

    Usage::

        with RunLock(run_dir) as lock:
            if lock.stale: ...  # the previous owner died holding it

    Args:
        run_dir: an existing folder.

    Attributes:
        stale: what the lock file said when it was taken over from a run that had died
            without releasing it (``{"pid": ..., "host": ..., "started": ...}``), else None.

    Raises:
        InputError: another live process holds the folder (its pid and start time are named),
            or the lock file cannot be created.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale: dict | None = None
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InputError(f"output folder {self.path.parent}: cannot create its lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise InputError(f"output folder {self.path.parent} is in use by another run ({holder}); wait for "
                                 f"it to finish or choose another --out") from None
            # the file may have been unlinked by its last owner between our open and our flock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        self.stale = previous or None  # a clean exit removes the file: content left means the owner died
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it) and let go."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def remove_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files that killed runs left in ``run_dir`` (and below); call with the lock held.

    Returns:
        The paths removed.
    """
    removed = []
    for path in sorted(Path(run_dir).rglob(TEMP_GLOB)):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def file_mode() -> int:
    """``0o666`` less the umask: the mode ``open()`` gives a new file (``mkstemp`` gives 0600)."""
    mask = os.umask(0)  # the umask can only be read by setting it
    os.umask(mask)
    return 0o666 & ~mask


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # half-written by a run killed while taking the lock
        return {"pid": "?"}
    return data if isinstance(data, dict) else {"pid": "?"}


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, float) else ""
    host = f" on {owner['host']}" if owner.get("host") else ""
    return f"pid {owner.get('pid', '?')}{host}{when}"
