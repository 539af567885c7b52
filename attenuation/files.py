"""Atomic file writes: the one way every run output (checkpoint, model, reports, plots) is written.

A file is written to a temporary beside its target, flushed to disk and renamed over the target,
so a reader (or a resumed run) never sees a half-written file. The temporary is named
``.<target name>.<pid>.tmp``, so the leftovers of a killed writer are recognisable and
:func:`remove_stale_temporaries` can delete them, and it is created with mode ``0o666`` filtered
by the umask: the target gets the permissions a plain ``open(path, "w")`` would give it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import torch

__all__ = [
    "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save",
    "remove_stale_temporaries",
]

PathLike = Union[str, os.PathLike]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into: it replaces ``path`` when the block
    ends, and is deleted instead when the block raises. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.unlink(missing_ok=True)  # a leftover of a killed writer that had this pid
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)


def remove_stale_temporaries(folder: PathLike, names) -> list[Path]:
    """Delete the temporaries that killed writers left beside the files ``names`` in ``folder``
    (any pid's, and the ``<name>*.tmp`` form of earlier versions); returns what was removed.
    Call it only while no other process writes those files."""
    folder = Path(folder)
    removed = []
    for name in names:
        for pattern in (f".{name}.*.tmp", f"{name}*.tmp"):
            for stale in folder.glob(pattern):
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed
