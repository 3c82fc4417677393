"""Waiting that works on a host whose wall clock is skewed.

``time.sleep`` is banned in this code base (ruff TID251): under libfaketime, as a node whose
clock is skewed runs, its absolute-deadline ``clock_nanosleep`` fails with EINVAL, and an
application on the mount would get that EINVAL. A timed wait on an event uses the monotonic
clock and works everywhere.
"""

from __future__ import annotations

import threading


def pause(seconds: float) -> None:
    """Sleep ``seconds`` (a float, >= 0) on the monotonic clock."""
    threading.Event().wait(seconds)
