"""matplotlib, imported only when a picture is asked for (it is the optional ``panther[plot]`` extra).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never through
pyplot's global state, so drawing works on machines without a display and does not change the backend
of a user's own pyplot session.
"""
from __future__ import annotations

import os

__all__ = ["require_matplotlib", "new_figure", "save_figure"]

INSTALL_HINT = "pip install 'panther[plot]' (or: pip install matplotlib)"


def require_matplotlib():
    """The ``matplotlib`` module, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"panther's pictures need matplotlib, which is not installed: {INSTALL_HINT}") from e
    return matplotlib


def new_figure(figsize, dpi=100):
    """A matplotlib ``Figure`` of ``figsize`` inches at ``dpi`` on an Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, fmt=None):
    """Write ``fig`` to ``path`` (format from ``fmt``, else from the file suffix); return the path as str.

    The saved picture is exactly ``figsize × dpi`` pixels (no tight bounding box)."""
    path = os.fspath(path)
    if fmt is None:
        fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fig.savefig(path, format=fmt, dpi=fig.dpi, facecolor="white")
    return path
