"""Atomic writes: a crash never leaves a half-written file that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import cache
from pathlib import Path


@cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def system_error(exc: BaseException) -> OSError | None:
    """The OSError with the system's errno behind exc (libraries such as pydicom re-raise it
    without the errno, the original as the cause), or None."""
    for _ in range(8):
        if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
            return exc
        exc = exc.__cause__ or exc.__context__
        if exc is None:
            return None
    return None


@contextmanager
def atomic_file(path, mode: str = "wb"):
    """Yield a file object open on a temporary sibling that becomes path only if the block
    succeeds; on any failure the old file (if any) stays and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            # on disk before the rename: after a power cut the name holds the old file or the
            # new one, never an empty file (ext4 may commit the rename before the data)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = system_error(exc)
        if cause is not None and cause.filename is None:  # a writer's error says what failed, not where
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_save_image(path, image, format: str = "PNG", **options) -> None:
    """Save a Pillow image atomically (options go to Image.save, e.g. compress_level=1)."""
    with atomic_file(path, "wb") as f:
        image.save(f, format=format, **options)


@contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory that becomes path only if the block succeeds.

    An existing path is replaced (moved aside first, removed after the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
