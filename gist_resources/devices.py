"""One GPU per concurrent step on a multi-GPU host.

Each step process takes an exclusive lock on one slot file per GPU (a lock is
released by the OS when the process ends, even on SIGKILL), so concurrent steps
get different devices without any coordinator.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from typing import IO

_held: dict[str, tuple[int, IO[str]]] = {}  # lock dir -> open file keeping this process's slot


def claim_slot(n_slots: int, lock_dir: str | None = None) -> int:
    """The index of a free slot in [0, n_slots), held until this process exits.

    When every slot is taken (more concurrent steps than GPUs: the pool limit is
    set too high), falls back to the process id modulo n_slots.
    """
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), "gist_gpu_slots")
    if lock_dir in _held:
        return _held[lock_dir][0]
    os.makedirs(lock_dir, exist_ok=True)
    for i in range(n_slots):
        fh = open(os.path.join(lock_dir, f"gpu{i}.lock"), "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _held[lock_dir] = (i, fh)
        return i
    return os.getpid() % n_slots
