"""Listener metrics (names fixed by DESIGN §3: dashboards and alert rules use them)."""
from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ListenerMetrics:
    """One set per process; a private registry keeps tests and several servers apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("ich_instances_received", "C-STORE requests received", registry=r)
        self.queued = Counter("ich_instances_queued", "CT slices queued for scoring", registry=r)
        self.ignored = Counter("ich_instances_ignored", "Instances accepted but not scored",
                               ["reason"], registry=r)
        self.rejected = Counter("ich_instances_rejected", "Instances refused with a failure status",
                                ["reason"], registry=r)
        self.associations_active = Gauge("ich_associations_active", "Open associations", registry=r)
        self.associations = Counter("ich_associations", "Associations by outcome",
                                    ["outcome"], registry=r)
        self.handler_seconds = Histogram(
            "ich_store_handler_seconds", "C-STORE handler time, request received to status",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        self.queue_depth = Gauge("ich_queue_depth", "Slices waiting in the score queue", registry=r)

    def watch_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the depth at scrape time (a stored value would be stale when idle); NaN when
        Redis is unreachable, which the alert rules can see."""
        def read() -> float:
            try:
                return float(depth())
            except Exception:  # scrape must not fail because Redis is down
                return math.nan
        self.queue_depth.set_function(read)
