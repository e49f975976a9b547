"""Reading one ``torch.save`` file: opened once, hashed while read, with clear one-line errors, and
pickled code refused unless trusted.

A checkpoint path reaches ``torch.load`` only through :func:`read_checkpoint`, so every command
says the same thing about an empty file, a text file, a truncated archive or a file that pickles
code (see :mod:`repdyn.model.pickled`). The sniff, the pickle scan, the content hash and
``torch.load`` all read one memory map of the file: a command opens a gigabyte checkpoint once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from repdyn.core.files import sha256_file
from repdyn.model.pickled import PickledCodeWarning, code_refused, pickled_code, pickled_globals

__all__ = ["read_checkpoint", "CheckpointFile", "file_sha", "SHA_HEX"]


SHA_HEX = 16  # the content hash's length in hex: cache keys, folder names, table rows


def file_sha(path: str | os.PathLike, n_hex: int = SHA_HEX) -> str:
    """Content hash (sha256 prefix): cache keys must change when the weights change."""
    return sha256_file(path)[:n_hex]


@dataclass(frozen=True)
class CheckpointFile:
    """A ``torch.save`` file read once: what it holds, and the :func:`file_sha` of the bytes read."""

    path: Path
    obj: Any
    sha: str


class _Map(mmap.mmap):
    """A read-only memory map that ``zipfile`` takes as a file (``mmap`` says ``seekable`` only from
    Python 3.13)."""

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes as one seekable buffer, from a single open: a read-only memory map (pages
    the kernel can drop, not a second copy of a gigabyte file), or the bytes read where the file
    cannot be mapped (empty, a pipe)."""
    with open(path, "rb") as f:
        try:
            buf: Any = _Map(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            buf = io.BytesIO(f.read())
    with buf:
        yield buf


def _buffer_sha(buf: Any) -> str:
    """:func:`file_sha` of a mapped file, hashed from the mapping (no second read of the file)."""
    return hashlib.sha256(buf.getvalue() if isinstance(buf, io.BytesIO) else buf).hexdigest()[:SHA_HEX]


def _not_torch_reason(buf: IO[bytes]) -> str | None:
    """Why ``buf`` cannot be a ``torch.save`` file, judged from its first bytes (None: it may be one).

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (PyTorch >= 1.6) or, in the
    legacy format, a pickle (protocol >= 2, first byte 0x80); very old files are tar archives.
    """
    buf.seek(0)
    head = buf.read(512)
    if not head:
        return "the file is empty"
    if head[:4] == b"PK\x03\x04":
        if zipfile.is_zipfile(buf):
            with zipfile.ZipFile(buf) as z:
                if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                    return "a zip archive without data.pkl"
        return None  # a (possibly truncated) torch zip: torch.load says what is wrong
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return None  # legacy torch.save (pickle)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return None  # pre-1.0 tar format
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with {head[:12]!r}, neither a zip archive nor a pickle"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it looks like a text file (starts {first!r})"


def _one_line(e: BaseException) -> str:
    """The informative line of an exception message (torch's weights-only errors span many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln
    return lines[0] if lines else type(e).__name__


def read_checkpoint(path: str | os.PathLike, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> CheckpointFile:
    """``torch.load`` with clear one-line errors, the file opened and read once: its content hash
    (:func:`file_sha`) is taken from the same bytes. ``trust=True`` allows pickled objects (official
    training checkpoints store an ``argparse.Namespace``) — only for files you trust. A file that
    pickles code (a ``__reduce__`` calling a function) is refused without ``trust`` and loaded with
    a :class:`PickledCodeWarning` with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a PyTorch checkpoint file")
    with _mapped(path) as buf:
        reason = _not_torch_reason(buf)
        if reason is not None:
            raise ValueError(f"{path} is not a PyTorch checkpoint (unreadable by torch.load: {reason}); "
                             "pass a .pt/.pth file written by torch.save")
        sha = _buffer_sha(buf)
        buf.seek(0)
        names = pickled_globals(buf)
        code = pickled_code(names) if names else []
        if code and trust:
            warnings.warn(f"{path} contains pickled code ({', '.join(code[:3])}{', ...' if len(code) > 3 else ''}): "
                          "loading it runs that code (--trust-checkpoint)", PickledCodeWarning, stacklevel=2)
        buf.seek(0)
        return CheckpointFile(path, _load(buf, path, trust, map_location, code), sha)


def _load(buf: IO[bytes], path: Path, trust: bool, map_location: str | torch.device, code: list[str]) -> Any:
    """``torch.load`` of the mapped file; its errors in one line naming ``path``."""
    try:
        return torch.load(buf, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        m = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if not trust and (m or code):
            refused = code or pickled_code([m.group(1).rstrip(".")])  # the scan, else torch's first refusal
            if refused:
                raise code_refused(path, refused) from None
            raise ValueError(
                f"{path} contains pickled Python objects (e.g. an argparse.Namespace, as official REPA/SRA "
                "training checkpoints do); if you trust the file, pass --trust-checkpoint (weights_only=False)"
            ) from None
        raise ValueError(f"checkpoint {path} is unreadable (corrupt or truncated?): {_one_line(e)}") from None
    except (ModuleNotFoundError, AttributeError) as e:
        raise ValueError(f"{path} pickles Python objects whose code is not importable here: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on damaged files
        raise ValueError(f"checkpoint {path} is unreadable (corrupt or truncated?): {_one_line(e)}") from None
