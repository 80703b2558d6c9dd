"""Child processes die with their parent.

A command killed with SIGKILL (the OOM killer, a cancelled job, `kill -9`) cannot stop its
children: DataLoader workers block flushing a queue nobody reads, pool workers wait for work
that never comes, and each keeps its memory for ever. Every child pneumo starts asks the kernel
for a signal when its parent dies (Linux's PR_SET_PDEATHSIG); elsewhere children still end when
the parent ends normally.
"""

from __future__ import annotations

import os
import signal


def _load_libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux (or no glibc)
        return None


_LIBC = _load_libc()  # loaded in the parent: a child between fork and exec must not import
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """In the child: get `sig` when the parent dies. Given the parent's pid, a child whose
    parent already died before this call (it raced the kill) ends at once."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def terminate_with_parent() -> None:
    """preexec_fn of a subprocess that should stop cleanly (SIGTERM) when its parent dies."""
    die_with_parent(sig=signal.SIGTERM)


def child_initializer():
    """(function, args) for a pool's initializer or a DataLoader's worker_init_fn: the child is
    killed with its parent, this process."""
    import functools

    return functools.partial(_init_child, os.getpid())


def _init_child(parent_pid: int, *_worker_id) -> None:
    die_with_parent(parent_pid)
