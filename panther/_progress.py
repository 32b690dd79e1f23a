"""One progress-bar helper for panther's long-running steps (calibration, benchmark sweeps, factorising
large models), so that they all behave alike.

A bar is drawn only on an interactive terminal: it stays silent when the stream is not a TTY (logs,
pipes, captured output), under pytest and when the ``CI`` environment variable is set. The environment
variable ``PANTHER_PROGRESS=1`` (or ``0``) forces it on (or off) everywhere; an explicit ``enabled=``
argument wins over both.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, TextIO

__all__ = ["progress", "progress_enabled"]


def progress_enabled(enabled: Optional[bool] = None, file: Optional[TextIO] = None) -> bool:
    """Whether a bar would be drawn on ``file`` (default ``sys.stderr``) for this ``enabled`` setting."""
    if enabled is not None:
        return bool(enabled)
    forced = os.environ.get("PANTHER_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if os.environ.get("CI") or "PYTEST_CURRENT_TEST" in os.environ:
        return False
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: Optional[str] = None,
             enabled: Optional[bool] = None, file: Optional[TextIO] = None, unit: str = "it",
             delay: float = 0.0, leave: bool = False):
    """A ``tqdm`` bar over ``iterable`` (or a manual one, advanced with ``.update(n)``, when it is None).

    Args:
        iterable: what to iterate over; ``total`` defaults to its ``len()``.
        total: number of steps (for a manual bar, or an iterable without ``len``).
        desc: text in front of the bar, e.g. ``"panther calibration"``.
        enabled: ``None`` (default): a bar only on an interactive terminal, never under pytest, when ``CI``
            is set, or in logs and pipes (``PANTHER_PROGRESS=0/1`` overrides this automatic choice);
            ``True``/``False`` force it.
        file: the stream to draw on (default ``sys.stderr``).
        unit: what one step is called.
        delay: draw nothing until the work has taken this many seconds (quick runs stay quiet).
        leave: keep the finished bar on screen.

    Returns the ``tqdm`` object: iterate over it, or call ``update``/``close`` (it is also a context
    manager). When disabled it costs nothing and writes nothing.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not progress_enabled(enabled, file), file=file,
                unit=unit, delay=delay, leave=leave, dynamic_ncols=True)
