"""Reading one ``torch.save`` file: clear one-line errors, and pickled code refused unless trusted.

A checkpoint path reaches ``torch.load`` only through :func:`read_checkpoint`, so every command
says the same thing about an empty file, a text file, a truncated archive or a file that pickles
code (see :mod:`repdyn.model.pickled`).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from repdyn.core.files import sha256_file
from repdyn.model.pickled import PickledCodeWarning, code_refused, pickled_code, pickled_globals

__all__ = ["read_checkpoint", "file_sha"]


def file_sha(path: str | os.PathLike, n_hex: int = 16) -> str:
    """Content hash (sha256 prefix): cache keys must change when the weights change."""
    return sha256_file(path)[:n_hex]


def _not_torch_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, judged from its first bytes (None: it may be one).

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (PyTorch >= 1.6) or, in the
    legacy format, a pickle (protocol >= 2, first byte 0x80); very old files are tar archives.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head[:4] == b"PK\x03\x04":
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
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


def read_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with clear one-line errors. ``trust=True`` allows pickled objects (official
    training checkpoints store an ``argparse.Namespace``) — only for files you trust. A file that
    pickles code (a ``__reduce__`` calling a function) is refused without ``trust`` and loaded with
    a :class:`PickledCodeWarning` with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a PyTorch checkpoint file")
    reason = _not_torch_reason(path)
    if reason is not None:
        raise ValueError(f"{path} is not a PyTorch checkpoint (unreadable by torch.load: {reason}); "
                         "pass a .pt/.pth file written by torch.save")
    names = pickled_globals(path)
    code = pickled_code(names) if names else []
    if code and trust:
        warnings.warn(f"{path} contains pickled code ({', '.join(code[:3])}{', ...' if len(code) > 3 else ''}): "
                      "loading it runs that code (--trust-checkpoint)", PickledCodeWarning, stacklevel=2)
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
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
