"""What a ``torch.save`` file pickles, read without unpickling anything.

``torch.load(weights_only=True)`` refuses anything beyond tensors and plain values, but its error
names one global and cannot tell data (the ``argparse.Namespace`` official training checkpoints
carry) from code (a ``__reduce__`` that calls a function). Scanning the pickle's opcodes first
lets the reader word its refusal and warn before ``trust=True`` runs code; ``torch.load`` still
decides what loads.
"""

from __future__ import annotations

import functools
import os
import pickletools
import zipfile
from pathlib import Path
from typing import IO

import torch

__all__ = ["PickledCodeWarning", "pickled_globals", "pickled_code", "code_refused"]


class PickledCodeWarning(UserWarning):
    """A checkpoint loaded with ``trust=True`` pickles code (functions or classes beyond plain data)."""


# Pickled data classes (not code) that published training checkpoints carry: refused without trust, with
# the "pickled Python objects" message; anything else beyond torch's weights-only set is "pickled code".
_PICKLED_DATA = ("argparse.Namespace", "numpy.", "collections.", "pathlib.", "datetime.", "builtins.slice",
                 "builtins.range", "builtins.frozenset", "builtins.set", "builtins.complex", "builtins.bytearray")


@functools.lru_cache(maxsize=1)
def _weights_only_globals() -> frozenset[str]:
    """``module.name`` of what ``torch.load(weights_only=True)`` accepts (torch's allow-list)."""
    try:
        from torch import _weights_only_unpickler as wou

        names = set(wou._get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private API: fall back to torch's own namespace
        names = set()
    for obj in getattr(torch.serialization, "get_safe_globals", lambda: [])():
        obj = obj[0] if isinstance(obj, tuple) else obj
        names.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return frozenset(names)


_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING")


def pickled_globals(file: str | os.PathLike | IO[bytes]) -> list[str] | None:
    """The ``module.name`` globals a ``torch.save`` zip file's pickle refers to, read without
    unpickling anything; None where the file is not a readable torch zip or a global cannot be
    named (only used to word messages and warnings: ``torch.load`` decides what loads).
    ``file``: a path or a seekable binary file (the reader's one mapping of the file)."""
    try:
        with zipfile.ZipFile(file) as z:
            member = next(n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            data = z.read(member)
        found: set[str] = set()
        pushed: list[str | None] = []  # what recent opcodes pushed (strings; None for anything else)
        memo: dict[int, str | None] = {}
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL":
                found.add(str(arg).replace(" ", ".", 1))
                pushed.append(None)
            elif name == "STACK_GLOBAL":  # protocol 4+: module and name are the two strings below
                if len(pushed) < 2 or pushed[-2] is None or pushed[-1] is None:
                    return None
                found.add(f"{pushed[-2]}.{pushed[-1]}")
                pushed[-2:] = [None]
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            else:
                pushed.append(str(arg) if name in _STRING_OPS else None)
        return sorted(found)
    except Exception:  # noqa: BLE001 - legacy/tar formats or a damaged zip: torch.load will judge
        return None


def pickled_code(names: list[str]) -> list[str]:
    """The globals of ``names`` that are code: neither torch's weights-only set nor plain data."""
    allowed = _weights_only_globals()
    return [n for n in names if n not in allowed and not n.startswith(_PICKLED_DATA)
            and not (len(allowed) < 10 and n.startswith("torch."))]  # torch's private allow-list unavailable


def code_refused(path: Path, code: list[str]) -> ValueError:
    """The one-line refusal of a file that pickles ``code`` (loaded without trust)."""
    more = ", ..." if len(code) > 3 else ""
    return ValueError(f"{path}: this file contains pickled code ({', '.join(code[:3])}{more}); refused (pass "
                      "--trust-checkpoint only if you trust it)")
