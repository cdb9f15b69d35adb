"""Helpers shared by every process's metrics (names: DESIGN §3)."""
from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import Gauge


def watch(gauge: Gauge, read: Callable[[], int]) -> None:
    """Read at scrape time (a stored value would be stale when idle); NaN when Redis is
    unreachable, which the alert rules can see."""
    def value() -> float:
        try:
            return float(read())
        except Exception:  # a scrape must not fail because Redis is down
            return math.nan
    gauge.set_function(value)
