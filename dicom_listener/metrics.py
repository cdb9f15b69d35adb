"""Listener metrics (names fixed by DESIGN §3: dashboards and alert rules use them)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ich.metrics import watch


class ListenerMetrics:
    """One set per process; a private registry keeps tests and several servers apart.

    `pooled`: a child of `python -m dicom_listener --processes N`. prometheus_client's
    multiprocess mode then writes the values to files the parent sums for its one /metrics;
    open associations are summed over live children, and the queue depth (read from Redis at
    scrape time) is the parent's own."""

    def __init__(self, registry: CollectorRegistry | None = None, pooled: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("ich_instances_received", "C-STORE requests received", registry=r)
        self.queued = Counter("ich_instances_queued", "CT slices queued for scoring", registry=r)
        self.ignored = Counter("ich_instances_ignored", "Instances accepted but not scored",
                               ["reason"], registry=r)
        self.rejected = Counter("ich_instances_rejected", "Instances refused with a failure status",
                                ["reason"], registry=r)
        self.associations_active = Gauge("ich_associations_active", "Open associations",
                                         registry=r, multiprocess_mode="livesum")
        self.associations = Counter("ich_associations", "Associations by outcome",
                                    ["outcome"], registry=r)
        self.handler_seconds = Histogram(
            "ich_store_handler_seconds", "C-STORE handler time, request received to status",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        if not pooled:
            self.queue_depth = queue_depth_gauge(r)

    def watch_queue_depth(self, depth: Callable[[], int]) -> None:
        watch(self.queue_depth, depth)


def queue_depth_gauge(registry: CollectorRegistry) -> Gauge:
    return Gauge("ich_queue_depth", "Slices waiting in the score queue", registry=registry)

