"""Figures for stage artifacts: matplotlib without pyplot, so no global state and no
display backend (stages may run in parallel processes or threads, headless)."""

from __future__ import annotations

from typing import Any


def figure(width: float, height: float) -> Any:
    """A `Figure` of `width` x `height` inches at 100 dpi, drawn by the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    made = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(made)
    return made
