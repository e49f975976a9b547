"""Atomic file writes: the one place the project turns bytes, text, tables, arrays, figures or
checkpoints into files.

Every writer goes through :func:`atomic_path`: the content lands in a temp file in the destination
folder, is flushed to disk and renamed over the target (``os.replace``, atomic on POSIX), so a
crash never leaves a torn file that looks complete. ``tempfile.mkstemp`` creates files with mode
0600; the final file gets ``0666 & ~umask`` instead, the mode ``open()`` would have given it, so
tables and reports stay readable to colleagues on a shared machine when the umask says so.

Two kinds of lock live here too: :func:`exclusive_lock` (``flock``) for a read-modify-write of one
file, and :func:`lock_folder`, the pid lock that makes one process the writer of an output or run
folder (``probe train`` and every analysis command).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "write_table", "write_npz", "save_figure",
           "save_torch", "sha256_file", "current_umask", "exclusive_lock", "pid_alive", "FOLDER_LOCK", "lock_folder",
           "unlock_folder", "held_folders", "check_writable", "not_writable_reason"]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.lock`` beside ``path`` for a read-modify-write.

    Atomic renames keep a file whole, but two processes that both read a table, add a row and write
    it back would still lose one row; the lock serialises them (processes of one machine or of an
    NFS mount with lock support). The lock file is left in place: removing it would race."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (for locks and partial files left by killed runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# One writer per folder: a pid lock that outlives nothing but its process
# ----------------------------------------------------------------------------------------------

FOLDER_LOCK = ".repdyn-output.lock"  # the pid of the process writing the folder
_HELD: set[Path] = set()


def lock_folder(path: str | os.PathLike) -> None:
    """Make this process the one writer of folder ``path`` (created if needed).

    The lock is a file holding our pid, created with ``O_EXCL``. A lock whose pid no longer runs
    (a killed process) or is ours is taken over; a live holder is a one-line error naming its pid,
    since two writers would mix their results. Shared by ``probe train`` and the analysis commands."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / FOLDER_LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise ValueError(f"{path} is being written by another probe process (pid {pid}); wait for it to "
                                 "finish or pass another --out") from None
            lock.unlink(missing_ok=True)  # stale (a killed run) or our own: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        _HELD.add(path.resolve())
        return
    raise ValueError(f"could not lock {path}: another process keeps taking it; pass another --out")


def unlock_folder(path: str | os.PathLike) -> None:
    """Drop this process's lock on ``path`` (a lock held by another pid is left alone)."""
    path = Path(path)
    lock = path / FOLDER_LOCK
    try:
        if int(lock.read_text().strip() or 0) == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
    _HELD.discard(path.resolve())


def held_folders() -> set[Path]:
    """The folders this process holds (resolved paths; a copy)."""
    return set(_HELD)


@atexit.register
def _unlock_all() -> None:
    for path in list(_HELD):
        unlock_folder(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it, give it the umask's mode and rename it
    over ``path``. On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_table(df: Any, path: str | os.PathLike) -> Path:
    """A pandas DataFrame as CSV (no index), atomically."""
    return atomic_write_text(path, df.to_csv(index=False))


def write_npz(path: str | os.PathLike, compressed: bool = True, **arrays: Any) -> Path:
    """Named numpy arrays as one ``.npz``, atomically."""
    import numpy as np

    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def save_figure(fig: Any, path: str | os.PathLike, pdf: bool = False, dpi: int = 150) -> Path:
    """A matplotlib figure as PNG (the suffix is forced; and PDF beside it if asked), closed after."""
    import matplotlib.pyplot as plt

    png = Path(path).with_suffix(".png")
    try:
        for target, fmt in [(png, "png")] + ([(png.with_suffix(".pdf"), "pdf")] if pdf else []):
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return png


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (checkpoints, classifier caches)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def not_writable_reason(e: OSError) -> str | None:
    """``e``'s cause in words if it says a place cannot be written (``read-only file system``,
    ``permission denied``), else None."""
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return None


def check_writable(path: str | os.PathLike, what: str = "") -> None:
    """Fail early, in one line, if ``path`` (a file or folder to be written; it need not exist yet)
    cannot be written: a temp file is created and removed in its nearest existing folder. ``what``
    names it in the message (e.g. ``--out``). Nothing is created."""
    target = Path(path)
    folder = target
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    label = f"{what} {target}" if what else str(target)
    if not folder.is_dir():
        if folder != target:  # a file where a folder has to be
            raise ValueError(f"{label} cannot be created: {folder} is a file, not a folder")
        folder = folder.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".repdyn-write-test.")
    except OSError as e:
        reason = not_writable_reason(e) or e.strerror or type(e).__name__
        where = "" if folder == target else f" at {folder}"
        raise ValueError(f"{label} is not writable ({reason}{where}): choose a writable location") from None
    os.close(fd)
    os.unlink(tmp)
