"""`python -m dicom_listener --processes N`: N listener processes on one DICOM port (issue 15).

One pynetdicom process is bound by the GIL (about 100 instances/s on one association, 0.6-0.7
of a bare pynetdicom SCP, DESIGN §6): scale comes from processes. Each child binds the port with
SO_REUSEPORT (`server.ListenerServer`) and the kernel spreads new connections across them. This
parent only supervises:

- restarts a child that dies (after 1 s, doubling to 30 s while it keeps dying within a minute);
- on SIGTERM/SIGINT forwards SIGTERM, so each child stops accepting and drains its open
  associations (`server.DRAIN_S`), and kills what is left after that;
- serves one `/metrics` for the pool: prometheus_client's multiprocess mode, counters and
  histograms summed over every child that ever ran (a restart does not reset them), open
  associations over live children, plus the queue depth and the pool's own
  `ich_listener_processes` / `ich_listener_restarts_total`.

Success keeps its meaning in every child: bytes and task are in Redis.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess, start_http_server

from dicom_listener.metrics import queue_depth_gauge
from dicom_listener.server import DRAIN_S
from ich.metrics import watch
from ich.queue import SliceQueue, connect
from ich.settings import Settings

log = logging.getLogger("dicom_listener.pool")

RESTART_BACKOFF_S = (1.0, 30.0)   # first delay, cap
STABLE_S = 60.0                   # a child up this long resets the backoff
POLL_S = 0.2


class Child:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index, self.argv, self.env = index, argv, env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.delay = RESTART_BACKOFF_S[0]
        self.restart_at = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()
        log.info("listener process %d started (pid %d)", self.index, self.proc.pid)


class Pool:
    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self.metrics_dir = tempfile.mkdtemp(prefix="ich-listener-metrics-")
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
               "ICH_LISTENER_PROCESSES": "1", "ICH_LISTENER_METRICS_PORT": "0"}
        # The children parse the same flags; the last --processes/--metrics-port wins.
        child_argv = [sys.executable, "-m", "dicom_listener", *argv,
                      "--processes", "1", "--metrics-port", "0", "--pool-child"]
        self.children = [Child(i, child_argv, env) for i in range(settings.listener_processes)]
        self.stopping = threading.Event()
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=self.metrics_dir)
        self.alive = Gauge("ich_listener_processes", "Listener processes running",
                           registry=self.registry)
        self.restarts = Counter("ich_listener_restarts", "Listener processes restarted after dying",
                                registry=self.registry)
        queue = SliceQueue(connect(settings.redis_url), settings.max_queue, settings.slice_ttl_s)
        watch(queue_depth_gauge(self.registry), queue.depth)

    def run(self) -> int:
        if self.settings.listener_metrics_port:
            start_http_server(self.settings.listener_metrics_port, registry=self.registry)
            log.info("metrics of %d listener processes on :%d/metrics", len(self.children),
                     self.settings.listener_metrics_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            for child in self.children:
                child.start()
            while not self.stopping.wait(POLL_S):
                self._supervise()
            self._stop()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return 0

    def _supervise(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if now >= child.restart_at:
                    child.start()
                    self.restarts.inc()
                continue
            code = child.proc.poll()
            if code is None:
                continue
            # A child that died: its live gauges go, its counters stay in the pool's sums.
            multiprocess.mark_process_dead(child.proc.pid, self.metrics_dir)
            up = now - child.started
            child.delay = RESTART_BACKOFF_S[0] if up >= STABLE_S else min(
                child.delay * 2, RESTART_BACKOFF_S[1])
            log.error("listener process %d (pid %d) exited with %s after %.0f s; restarting in "
                      "%.0f s", child.index, child.proc.pid, code, up, child.delay)
            child.proc, child.restart_at = None, now + child.delay
        self.alive.set(sum(c.proc is not None and c.proc.poll() is None for c in self.children))

    def _stop(self) -> None:
        """SIGTERM to every child (each drains its associations), SIGKILL after the drain."""
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        log.info("stopping %d listener process(es)", len(running))
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_S + 10
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("listener pid %d still running after the drain; killing it", proc.pid)
                proc.kill()
                proc.wait()
        self.alive.set(0)
