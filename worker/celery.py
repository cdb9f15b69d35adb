"""The Celery application: broker, reliability settings, queues, and process start-up hooks.

Reliability (DESIGN §4): tasks ack late and are rejected back to the queue on worker loss;
kombu's Redis transport redelivers an unacknowledged message after `visibility_timeout`, which
we set to ICH_VISIBILITY_TIMEOUT_S (60 s) instead of the transport's default hour, and looks
for such messages every few seconds instead of every ~100 s.
"""
from __future__ import annotations

import logging

from celery import Celery, signals
from kombu import Queue

from ich import keys
from ich.settings import Settings

settings = Settings.from_env()

app = Celery("ichwatch", broker=settings.redis_url, include=["worker.tasks"])
app.conf.update(
    task_queues=[Queue(keys.SCORE_QUEUE), Queue(keys.ALERTS_QUEUE)],
    task_default_queue=keys.SCORE_QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    # A full batch must be able to form while the previous one is scored (celery-batches).
    worker_prefetch_multiplier=2 * settings.batch_max,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu sweeps for expired unacked messages every interval × throttle seconds: 10 × 10
        # by default, which would leave a killed worker's slices waiting ~100 s past the
        # visibility timeout. Sweep every few seconds instead (one ZRANGE each).
        "unacked_restore_interval": max(1, min(5, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(30, settings.visibility_timeout_s),
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "retry_on_timeout": True,
        "health_check_interval": 30,
    },
)


@signals.setup_logging.connect
def _logging(**_) -> None:
    """Our format and level for every worker; the settings line never holds secrets."""
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("worker").info("settings: %s", settings.describe())


def consumed_queues() -> set[str]:
    return set(app.amqp.queues.consume_from)
