"""How the toolkit speaks to users: a warning is one line that says what to do (no source location)."""

from __future__ import annotations

import sys

__all__ = ["one_line_warning"]


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning`` that prints ``warning: <message>`` on one line; the CLI and the
    study's worker processes install it."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
