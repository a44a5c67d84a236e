"""One live run per `output_dir`: a lock file naming the holding process, taken before the run's first write and
removed when it ends. A lock whose process is gone (killed, crashed, its machine rebooted) is stale and is taken
over; one held by a live process, or by another machine, makes a second run exit 2 naming it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from hf_finetune.errors import InputError

LOCK_NAME = ".hf_finetune.lock"


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: nothing here can tell whether it lives
    if pid == os.getpid():
        return False  # this process's own earlier run, over or abandoned: one process trains one run at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = _started(pid)
    return started is None or holder.get("started") in (None, started)


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or foreign: no live process named
    return holder if isinstance(holder, dict) else {}


def check_unlocked(out: Path) -> None:
    """Refuse (exit 2) an output_dir that a live run holds; reads only, so a refused run writes nothing."""
    holder = _holder(out / LOCK_NAME)
    if holder is not None and _alive(holder):
        where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
        raise InputError(
            f"output_dir: {out} is in use by another run (process {holder['pid']}{where}, since "
            f"{holder.get('since', '?')}); wait for it, stop it, or choose another output_dir (a lock left by a "
            f"process that is gone is {out / LOCK_NAME}, which may then be deleted)"
        )


def acquire(out: Path) -> Path:
    """Take the lock (after `check_unlocked` and every other check passed): created exclusively, so that of two runs
    starting together one wins and the other exits 2. A stale lock is replaced."""
    import datetime

    path = out / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _started(os.getpid()),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            check_unlocked(out)  # live: exit 2 naming it
            path.unlink(missing_ok=True)  # stale: take it over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    check_unlocked(out)
    raise InputError(f"output_dir: could not take the lock {path}; is another run starting there?")


def release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
