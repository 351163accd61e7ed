"""One writer per run directory: ``RUN_DIR/.lock`` names the owner (pid, host) and is held with ``flock``.

The kernel releases an ``flock`` when its process dies, however it dies (SIGKILL included), so a
lock file left behind by a dead writer is simply taken over: no pid guessing, no stale-lock race.
Where ``flock`` is unavailable the file is created with ``O_EXCL`` and a lock naming a dead pid
on this host is taken over. A second writer gets a :class:`RunLockedError` naming the owner.

The lock is re-entrant within a process (``experiment.train`` holds it and the Trainer's
``fit()`` takes it again), and released -- the file removed -- when the outermost holder exits,
by return or by exception.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

try:
    import fcntl
except ImportError:  # not POSIX (Windows): O_EXCL + pid check only
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

# realpath of the lock file -> [fd, depth] for the locks this process holds
_HELD: Dict[str, List[int]] = {}


class RunLockedError(ValueError):
    """Another live process is writing to this run directory (a user error: the CLI prints one line)."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _read_owner(path: Path) -> Dict[str, object]:
    try:
        return dict(json.loads(path.read_text() or "{}"))
    except (OSError, ValueError, TypeError):
        return {}


def _describe(owner: Dict[str, object]) -> str:
    if not owner.get("pid"):
        return "another process"
    return f"pid {owner['pid']}" + (f" on {owner['host']}" if owner.get("host") else "")


def _owner_record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()


class RunLock:
    """``with RunLock(run_dir):`` -- exclusive write access to ``run_dir`` (which must exist)."""

    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.path = Path(run_dir) / LOCK_FILE
        self._key: Optional[str] = None

    def acquire(self) -> "RunLock":
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            _HELD[key] = [self._acquire_fd(), 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        try:
            os.unlink(self.path)  # still holding the flock: a waiter re-checks the inode (below)
        except FileNotFoundError:
            pass
        os.close(entry[0])

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _refuse(self, owner: Dict[str, object]) -> RunLockedError:
        return RunLockedError(
            f"{self.path.parent} is in use by {_describe(owner)} (lock file {self.path}); wait for it to "
            "finish or stop it -- one writer per run directory"
        )

    def _acquire_fd(self) -> int:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                os.close(fd)
                return self._acquire_excl()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(_read_owner(self.path)) from None
                return self._acquire_excl()  # a file system without flock
            # The holder removes the file before unlocking: if ours is no longer the file at the
            # path, someone released (or took over) in between -- try again on the new file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, _owner_record(), 0)
            os.fsync(fd)
            return fd
        raise self._refuse(_read_owner(self.path))

    def _acquire_excl(self) -> int:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                pid = owner.get("pid")
                mine = owner.get("host") in (None, socket.gethostname())
                if isinstance(pid, int) and mine and not pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its owner died
                    continue
                raise self._refuse(owner) from None
            os.write(fd, _owner_record())
            os.fsync(fd)
            return fd
        raise self._refuse(_read_owner(self.path))


__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "pid_alive"]
