"""`python -m dicom_listener`: run the DICOM node until SIGTERM/SIGINT.

Flags override the `ICH_*` environment (DESIGN §3); settings are logged without secrets.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from prometheus_client import start_http_server

from dicom_listener import server
from dicom_listener.handlers import Handlers
from dicom_listener.metrics import ListenerMetrics
from dicom_listener.pool import Pool
from ich.queue import SliceQueue, connect
from ich.settings import Settings, SettingsError

log = logging.getLogger("dicom_listener")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dicom_listener", description=__doc__.splitlines()[0])
    p.add_argument("--ae-title", help="our AE title (ICH_AE_TITLE)")
    p.add_argument("--host", dest="dicom_host", help="listen address (ICH_DICOM_HOST)")
    p.add_argument("--port", dest="dicom_port", type=int, help="DICOM port (ICH_DICOM_PORT)")
    p.add_argument("--redis-url", help="Redis URL (ICH_REDIS_URL)")
    p.add_argument("--metrics-port", dest="listener_metrics_port", type=int,
                   help="/metrics port, 0 = off (ICH_LISTENER_METRICS_PORT)")
    p.add_argument("--max-queue", type=int, help="back-pressure limit (ICH_MAX_QUEUE)")
    p.add_argument("--processes", dest="listener_processes", type=int,
                   help="listener processes on one port, supervised (ICH_LISTENER_PROCESSES)")
    p.add_argument("--pool-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (ICH_LOG_LEVEL)")
    return p.parse_args(argv)


def configure_logging(level: str, pooled: bool = False) -> None:
    pid = "[%(process)d]" if pooled else ""   # which process of a pool said it
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s{pid}: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # per-PDU chatter at INFO


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(**{k: v for k, v in vars(args).items() if k != "pool_child"})
        settings.require_files("tls_cert", "tls_key", "tls_ca")
    except SettingsError as exc:
        raise SystemExit(f"python -m dicom_listener: {exc}") from None
    pooled = args.pool_child   # a child of --processes N: the parent logged the settings
    configure_logging(settings.log_level, pooled or settings.listener_processes > 1)
    if settings.listener_processes > 1:
        log.info("settings: %s", settings.describe())
        raise SystemExit(Pool(settings, sys.argv[1:] if argv is None else argv).run())
    if not pooled:
        log.info("settings: %s", settings.describe())

    queue = SliceQueue(connect(settings.redis_url), settings.max_queue, settings.slice_ttl_s)
    metrics = ListenerMetrics(pooled=pooled)
    if not pooled:
        metrics.watch_queue_depth(queue.depth)
    if settings.listener_metrics_port:
        start_http_server(settings.listener_metrics_port, registry=metrics.registry)
        log.info("metrics on :%d/metrics", settings.listener_metrics_port)

    ae = server.build_ae(settings)
    running = server.start(ae, settings, Handlers(queue, metrics).bindings())
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("stopping: no new associations, draining open ones")
    server.stop(running)
    log.info("stopped")


if __name__ == "__main__":
    main()
