"""Worker and alert-delivery metrics (names fixed by DESIGN §3).

Celery runs our tasks in the worker's main process (`--pool solo` for scoring, `--pool threads`
for delivery), so the default registry of that process is the one `/metrics` serves.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

slices_scored = Counter("ich_slices_scored", "Slices scored by the model")
slices_failed = Counter("ich_slices_failed", "Slices that could not be scored", ["reason"])
batch_size = Histogram("ich_batch_size", "Slices per forward pass",
                       buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128))
queue_wait = Histogram("ich_queue_wait_seconds", "Received at the listener → batch start",
                       buckets=_LATENCY)
preprocess = Histogram("ich_preprocess_seconds", "Fetch + decode + window, per batch",
                       buckets=_LATENCY)
inference = Histogram("ich_inference_seconds", "Forward pass, per batch", buckets=_LATENCY)
end_to_end = Histogram("ich_end_to_end_seconds", "Received at the listener → scored",
                       buckets=_LATENCY)
time_to_alert = Histogram("ich_time_to_alert_seconds",
                          "Positive slice received → first_positive accepted by a webhook",
                          buckets=_LATENCY)
alerts = Counter("ich_alerts", "Alerts raised", ["kind"])
deliveries = Counter("ich_webhook_deliveries", "Webhook delivery attempts by outcome: delivered, "
                     "retry, dead_letter, duplicate (a redelivered copy of a delivered alert, not "
                     "POSTed)", ["outcome"])
results = Counter("ich_dicom_results", "DICOM result deliveries (SR + key image) by outcome: stored, "
                  "retry, dead_letter, unchanged, no_evidence", ["outcome"])
model_info = Gauge("ich_model_info", "The model version this worker serves", ["version"])
queue_depth = Gauge("ich_queue_depth", "Slices waiting in the score queue")
slices_pending = Gauge("ich_slices_pending", "Slices accepted and not yet scored or failed (the ledger)")
slices_requeued = Counter("ich_slices_requeued",
                          "Slices the reconciler re-queued: no result and no message in flight")

