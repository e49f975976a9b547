"""How a timestep is written in tables, titles and folder names, the same for every floor."""

from __future__ import annotations

__all__ = ["format_t"]


def format_t(t) -> str:
    """A timestep as people write it: ``0.3`` (SiT), ``250`` (DiT)."""
    tf = float(t)
    return str(int(tf)) if tf == int(tf) and abs(tf) >= 1 else f"{tf:g}"
