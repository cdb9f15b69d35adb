"""The scoring hot path: one batch of queued slices → probabilities → study state and alerts.

`Scorer` is built once per worker process (the model load is the expensive part) and has three
steps, each testable alone: `pre_process` (one MGET for the batch's bytes, decode and window in
parallel threads: a bad slice fails alone), `predict` (one compiled forward pass per batch) and
`post_process` (study state; which studies the batch touched), then `due_alert` per study
(the study rule over every slice of the study scored so far).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import redis
from threadpoolctl import threadpool_limits

from ich import imaging, keys
from ich.decision import StudyRule
from ich.labels import ANY, LABELS
from ich.model import ArtifactError, load_artifact
from ich.queue import SliceMeta
from ich.settings import Settings
from worker import metrics
from worker.study import FIRST_POSITIVE, SliceResult, StudyStore

log = logging.getLogger("worker.scoring")
_META_FIELDS = {f.name for f in fields(SliceMeta)}


def meta_from_kwargs(kwargs: dict) -> SliceMeta:
    """Task kwargs → SliceMeta, ignoring fields a newer listener may add."""
    return SliceMeta(**{k: v for k, v in kwargs.items() if k in _META_FIELDS})


class Scorer:
    def __init__(self, settings: Settings, client: redis.Redis, model_dir: Path | None = None) -> None:
        import tensorflow as tf

        _gpu_memory_growth(tf)
        # Slices are decoded in parallel threads; a multi-threaded BLAS inside each resize
        # oversubscribes the cores and spin-waits against TensorFlow (measured: 5x slower).
        threadpool_limits(1, user_api="blas")
        self.model, self.card = load_artifact(model_dir or settings.model_dir)
        if self.card.status == "failed":
            if not settings.allow_failed_model:
                raise ArtifactError(
                    f"model {self.card.version} failed training's quality check "
                    f"({'; '.join(self.card.verdict.get('reasons', [])) or 'see model.json'}): "
                    "not serving it (ICH_ALLOW_FAILED_MODEL=1 serves it anyway, for inspection)")
            log.warning("serving model %s although it FAILED training's quality check "
                        "(ICH_ALLOW_FAILED_MODEL)", self.card.version)
        self.version = self.card.version
        self.size = int(self.card.input_size)
        # The study decision training calibrated (ich.decision), ICH_THRESHOLD_* on top.
        self.rule = StudyRule.from_card(self.card.study_rule, settings.thresholds(self.card.thresholds))
        self.thresholds = dict(self.rule.thresholds)
        self.client = client
        self.batch_max = settings.batch_max
        self.keep_evidence = bool(settings.result_destinations)
        self._blobs: dict[str, bytes] = {}
        self.studies = StudyStore(client, settings.result_ttl_s)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        # One trace for every batch size: the batch dimension is left open in the signature.
        model = self.model
        self._forward = tf.function(
            lambda x: model(x, training=False), reduce_retracing=True,
            input_signature=[tf.TensorSpec((None, self.size, self.size, 3), tf.float32)])
        self._forward(tf.zeros((1, self.size, self.size, 3)))  # compile now, not on a patient
        metrics.model_info.labels(self.version).set(1)
        log.info("model %s loaded (%s, %dx%d), study rule %s, thresholds %s", self.version,
                 self.card.engine, self.size, self.size, self.rule, self.thresholds)

    # --- the three steps -------------------------------------------------------------------

    def pre_process(self, metas: list[SliceMeta]) -> tuple[np.ndarray, list[SliceResult], list[SliceResult]]:
        """Fetch and decode. Returns (images, the results they will fill, failed results). A
        multi-frame CT instance gives one image and one result per frame."""
        blobs = self.client.mget([keys.slice_bytes(m.token) for m in metas])
        self._blobs = {m.token: b for m, b in zip(metas, blobs) if b is not None}
        decoded = list(self._pool.map(self._decode, blobs))
        images, pending, failed = [], [], []
        for meta, (frames, reason) in zip(metas, decoded):
            if frames is None:
                failed.append(SliceResult(meta, error=reason, scored_at=time.time()))
                continue
            for frame in frames:
                images.append(frame.image)
                pending.append(SliceResult(meta, frame=frame.number, position=frame.position))
        array = np.stack(images) if images else np.zeros((0, self.size, self.size, 3), np.float32)
        return array, pending, failed

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) → (n, 6) probabilities in LABELS order; forward passes of at most
        ICH_BATCH_MAX images (a multi-frame instance can bring hundreds)."""
        if not len(images):
            return np.zeros((0, len(LABELS)), np.float32)
        return np.concatenate([self._forward(images[i:i + self.batch_max]).numpy()
                               for i in range(0, len(images), self.batch_max)])

    def post_process(self, pending: list[SliceResult], probabilities: np.ndarray,
                     failed: list[SliceResult]) -> list[str]:
        """Record every result; return the studies of the batch. Failed slices count too: a
        redelivered copy of a slice recorded just before a kill finds its bytes gone, and its
        study's first_positive may still be unsent."""
        now = time.time()
        results = [replace(r, probabilities=dict(zip(LABELS, map(float, p))), scored_at=now)
                   for r, p in zip(pending, probabilities)]
        self.studies.record(results + failed, self.rule, self.version)
        if self.keep_evidence:
            self._keep_evidence(results)
        for r in failed:
            metrics.slices_failed.labels(r.error).inc()
            log.warning("slice %s of study %s failed: %s", r.meta.sop_instance_uid,
                        r.meta.study_instance_uid, r.error)
        metrics.slices_scored.inc(len(results))
        for r in results:
            metrics.end_to_end.observe(now - r.meta.received_at)
        return list(dict.fromkeys(r.meta.study_instance_uid for r in results + failed))

    # --- one batch ---------------------------------------------------------------------------

    def score(self, metas: list[SliceMeta]) -> list[str]:
        """Score and record a batch; returns the studies it touched (the caller then asks
        `due_alert` of each, outside its re-send guard: once results are recorded and their
        bytes dropped, re-sending the batch would only lose them)."""
        started = time.time()
        for m in metas:
            metrics.queue_wait.observe(max(0.0, started - m.received_at))
        images, pending, failed = self.pre_process(metas)
        metrics.preprocess.observe(time.time() - started)
        metrics.batch_size.observe(len(pending))
        t = time.perf_counter()
        probabilities = self.predict(images)
        metrics.inference.observe(time.perf_counter() - t)
        return self.post_process(pending, probabilities, failed)

    def _keep_evidence(self, results: list[SliceResult]) -> None:
        """For the DICOM results (ICH_RESULT_DESTINATIONS): each study's header once, and its
        most suspicious slice so far in the brain window at full resolution. Only a slice that
        beats the kept one is decoded again; a failure here never fails the batch."""
        best: dict[str, SliceResult] = {}
        for r in results:
            uid = r.meta.study_instance_uid
            if r.meta.token in self._blobs and (uid not in best or r.probabilities[ANY] > best[uid].probabilities[ANY]):
                best[uid] = r
        for uid, r in best.items():
            try:
                self.studies.keep_evidence(uid, self._blobs[r.meta.token], r)
            except Exception:  # noqa: BLE001 - the result is recorded; only the key image is missing
                log.warning("could not keep the key image of study %s", uid, exc_info=True)

    def due_alert(self, study_uid: str) -> dict | None:
        """The study's first_positive alert if the study rule is now met and it was not sent."""
        if self.studies.alerted(study_uid, self.version, FIRST_POSITIVE):
            return None  # the common case once a study has alerted: skip the rule
        alert = self.studies.build_alert(FIRST_POSITIVE, study_uid)
        return alert if alert["positive"][ANY] else None

    def _decode(self, blob: bytes | None) -> tuple[list[imaging.Frame] | None, str]:
        if blob is None:
            return None, "expired"  # bytes outlived ICH_SLICE_TTL_S before scoring
        try:
            return imaging.load_frames(blob, self.size), ""
        except imaging.SliceError as exc:
            return None, exc.reason
        except Exception as exc:  # the edge of one slice: whatever it is, it fails alone
            log.warning("decoder raised %s; slice failed as undecodable", type(exc).__name__)
            return None, "undecodable"


def _gpu_memory_growth(tf) -> None:
    """Take GPU memory as needed, not all at start: several processes can share a card."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
