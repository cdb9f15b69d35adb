"""Per-study state in Redis and the alerts built from it (DESIGN §1, §3, §4).

A study is two hashes with a TTL: `study_state` (series, accession, calling AE, first receipt,
model version, study rule and thresholds) and `study_results` (one JSON result per SOP Instance UID, so a
redelivered slice overwrites itself instead of counting twice), plus its place in the
`ACTIVE_STUDIES` sorted set, scored by last activity, from which quiet studies are claimed
for their summary. Alert markers (`SET NX`) make every (study, model version, kind) alert
happen once, however often a slice is redelivered.

Whether a study is positive is decided by the model's study rule (`ich.decision`, the same code
training calibrated it with) over every slice of the study scored so far; `build_alert` applies
it, so the scoring worker and the summary sweeper of the alerts process decide alike.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from ich import imaging, keys
from ich.decision import SliceScore, StudyRule
from ich.labels import ANY, LABELS
from ich.queue import SliceMeta

FIRST_POSITIVE = "first_positive"
STUDY_SUMMARY = "study_summary"
_ALERT_NAMESPACE = uuid.UUID("6f1b8c2e-4a7d-5e3f-9b21-0c8d7e6a5f43")


# KEYS: study results hash.  ARGV: SOP Instance UID, receipt token, result JSON.
# A redelivered copy of a message (same token) never overwrites the result its first copy
# recorded: the bytes are gone by then, so the copy could only record "expired" over real
# probabilities (issue 14 item 3). A new receipt of the same SOP Instance (a resend) replaces it.
_RECORD_ONCE_LUA = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and rec['token'] == ARGV[2] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: alert marker, alerts queue, active studies.  ARGV: ttl, study uid, quiet cutoff
# (-1 = none), delivery messages...
_PUBLISH_ONCE_LUA = """
local cutoff = tonumber(ARGV[3])
if cutoff >= 0 then
  local last = redis.call('ZSCORE', KEYS[3], ARGV[2])
  if last and tonumber(last) > cutoff then return 0 end
  redis.call('ZREM', KEYS[3], ARGV[2])
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
for i = 4, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
return 1
"""


# KEYS: evidence hash.  ARGV: ttl, header ('' = keep), key `any`, field/value pairs of the key
# slice. Two workers scoring the same study keep the higher slice.
_EVIDENCE_LUA = """
if ARGV[2] ~= '' then redis.call('HSETNX', KEYS[1], 'header', ARGV[2]) end
local current = redis.call('HGET', KEYS[1], 'key_any')
if #ARGV > 3 and (not current or tonumber(ARGV[3]) > tonumber(current)) then
  for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


@dataclass
class SliceResult:
    """One slice's outcome: probabilities in LABELS order, or the reason it failed."""

    meta: SliceMeta
    probabilities: dict[str, float] | None = None
    error: str | None = None
    scored_at: float = 0.0
    frame: int | None = None        # frame number of a multi-frame CT instance
    position: float | None = None   # that frame's z (the meta has the instance's)

    @property
    def key(self) -> str:
        """Its field in the study's results hash: the SOP Instance UID, per frame for a
        multi-frame instance."""
        uid = self.meta.sop_instance_uid
        return uid if self.frame is None else f"{uid}#{self.frame}"

    def positive(self, thresholds: dict[str, float]) -> dict[str, bool]:
        """Per label, whether this slice alone reaches the threshold. Informative only: the
        study rule decides (under `consecutive`, one such slice is not enough)."""
        p = self.probabilities or {}
        return {label: p.get(label, 0.0) >= thresholds[label] for label in LABELS}

    def to_json(self, thresholds: dict[str, float], model_version: str) -> str:
        m = self.meta
        record: dict[str, Any] = {
            "sop_instance_uid": m.sop_instance_uid, "series_instance_uid": m.series_instance_uid,
            "instance_number": m.instance_number,
            "slice_position": m.slice_position if self.frame is None else self.position,
            "received_at": m.received_at, "scored_at": self.scored_at,
            "model_version": model_version, "token": m.token,
        }
        if self.frame is not None:
            record["frame_number"] = self.frame
        if self.error:
            record["error"] = self.error
        else:
            record["probabilities"] = self.probabilities
            record["positive"] = self.positive(thresholds)
        return json.dumps(record)


class StudyStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._script = None

    def record(self, results: list[SliceResult], rule: StudyRule, model_version: str) -> None:
        """Store a batch of results, drop their slice bytes and their ledger entries, in one
        transaction. A result already recorded for the same receipt (a redelivered message) is
        kept."""
        now = time.time()
        thresholds = dict(rule.thresholds)
        pipe = self.client.pipeline(transaction=True)
        for r in results:
            m = r.meta
            state = keys.study_state(m.study_instance_uid)
            pipe.eval(_RECORD_ONCE_LUA, 1, keys.study_results(m.study_instance_uid),
                      r.key, m.token, r.to_json(thresholds, model_version))
            for name, value in (("series_instance_uid", m.series_instance_uid),
                                ("accession_number", m.accession_number),
                                ("calling_ae", m.calling_ae),
                                ("first_received_at", m.received_at)):
                pipe.hsetnx(state, name, value)
            decided_by = {"model_version": model_version, "thresholds": json.dumps(thresholds),
                          "study_rule": json.dumps(rule.describe())}
            if r.error:   # a failure never replaces the rule the study's scored slices had
                for name, value in decided_by.items():
                    pipe.hsetnx(state, name, value)
            else:
                pipe.hset(state, mapping=decided_by)
            pipe.expire(state, self.ttl_s)
            pipe.expire(keys.study_results(m.study_instance_uid), self.ttl_s)
            pipe.zadd(keys.ACTIVE_STUDIES, {m.study_instance_uid: now})
            pipe.delete(keys.slice_bytes(m.token))
            pipe.zrem(keys.LEDGER, m.token)   # resolved: the reconciler leaves it alone
            pipe.hdel(keys.LEDGER_MESSAGES, m.token)
        pipe.execute()

    def keep_evidence(self, study_uid: str, blob: bytes, result: SliceResult) -> None:
        """Keep what the study's DICOM results are built from (keys.study_evidence): its header
        once, and `result`'s slice if it is the most suspicious so far (decoded again only
        then, at full resolution, brain window)."""
        key = keys.study_evidence(study_uid)
        has_header, current = self.client.pipeline().hexists(key, "header").hget(key, "key_any").execute()
        p = float(result.probabilities[ANY])
        better = current is None or p > float(current)
        if has_header and not better:
            return
        ds = imaging.read_dataset(blob)
        fields: list = []
        if better:
            frame, = imaging.load_frames(ds, max(int(ds.Rows), int(ds.Columns)), only=result.frame)
            pixels = np.round(frame.image[..., 0] * 255).astype(np.uint8)   # channel 0: brain window
            m = result.meta
            fields = ["key_any", repr(p), "key_pixels", pixels.tobytes(),
                      "key_shape", f"{pixels.shape[0]}x{pixels.shape[1]}",
                      "key_sop_instance_uid", m.sop_instance_uid, "key_sop_class_uid", str(ds.SOPClassUID),
                      "key_series_instance_uid", m.series_instance_uid, "key_frame", result.frame or 0]
        self.client.eval(_EVIDENCE_LUA, 1, key, self.ttl_s,
                         b"" if has_header else imaging.header_bytes(ds), repr(p), *fields)

    def evidence(self, study_uid: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.client.hgetall(keys.study_evidence(study_uid)).items()}

    def publish_once(self, alert: dict[str, Any], messages: list[bytes],
                     quiet_before: float | None = None) -> bool:
        """Claim the alert's (study, model version, kind) and push its delivery tasks in one
        atomic script: exactly once, and never claimed-but-unsent if a process dies.

        With `quiet_before`, the study must also still be quiet (no slice scored since that
        time) and leaves ACTIVE_STUDIES: a summary is never sent for a study still arriving."""
        marker = keys.alert_sent(alert["study_instance_uid"], alert["model_version"], alert["kind"])
        return bool(self._publish_once(
            keys=[marker, keys.ALERTS_QUEUE, keys.ACTIVE_STUDIES],
            args=[self.ttl_s, alert["study_instance_uid"],
                  -1 if quiet_before is None else quiet_before, *messages]))

    def alerted(self, study_uid: str, model_version: str, kind: str) -> bool:
        return bool(self.client.exists(keys.alert_sent(study_uid, model_version, kind)))

    def quiet_studies(self, quiet_s: float, now: float | None = None) -> list[str]:
        """Studies with no slice scored for `quiet_s` seconds, due for their summary."""
        cutoff = (now or time.time()) - quiet_s
        return [uid.decode() for uid in self.client.zrangebyscore(keys.ACTIVE_STUDIES, "-inf", cutoff)]

    @property
    def _publish_once(self):
        if self._script is None:
            self._script = self.client.register_script(_PUBLISH_ONCE_LUA)
        return self._script

    def results(self, study_uid: str) -> list[dict[str, Any]]:
        raw = self.client.hvals(keys.study_results(study_uid))
        records = [json.loads(v) for v in raw]
        return sorted(records, key=lambda r: (r.get("instance_number") or 0, r["sop_instance_uid"],
                                              r.get("frame_number") or 0))

    def state(self, study_uid: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(keys.study_state(study_uid)).items()}

    def decide(self, study_uid: str):
        """The study rule on every slice of the study scored so far: (state, slice records,
        the scored ones, rule, decision). The rule and thresholds are those the scoring worker stored
        with the results, so the alerts process needs no model."""
        state = self.state(study_uid)
        rule = StudyRule.from_card(json.loads(state.get("study_rule") or "null"),
                                   json.loads(state["thresholds"]))
        records = self.results(study_uid)
        scored = [r for r in records if "probabilities" in r]
        decision = rule.decide([
            SliceScore([r["probabilities"][label] for label in LABELS], r.get("series_instance_uid") or "",
                       r.get("slice_position"), _neighbour_number(r))
            for r in scored])
        return state, records, scored, rule, decision

    def build_alert(self, kind: str, study_uid: str) -> dict[str, Any]:
        """The alert JSON of DESIGN §3 from what Redis holds now. No patient name, ID or
        birth date is ever stored, so none can appear here.

        `positive` is the study rule's verdict per label; `scores` the study scores it
        compared with `thresholds`; `positive_slices`, when the study is positive, the slices
        behind the `any` score and every slice that alone reaches its threshold. A first_positive's `received_at` is the receipt of the latest of
        those slices: the moment the study became positive."""
        state, records, scored, rule, decision = self.decide(study_uid)
        probabilities = {label: max((r["probabilities"][label] for r in scored), default=0.0)
                         for label in LABELS}
        # The slices behind the `any` score, and every slice that alone reaches the threshold:
        # where a reader should look first.
        t = rule.thresholds[ANY]
        chosen = set(decision.evidence) | {i for i, r in enumerate(scored) if r["probabilities"][ANY] >= t}
        evidence = [scored[i] for i in sorted(chosen)] if decision.any else []
        positive_slices = [
            {"sop_instance_uid": r["sop_instance_uid"], "instance_number": r["instance_number"],
             **({"frame_number": r["frame_number"]} if "frame_number" in r else {}),
             "probabilities": r["probabilities"]}
            for r in sorted(evidence, key=_reading_order)]
        model_version = state["model_version"]
        if kind == FIRST_POSITIVE and evidence:
            received = max(float(scored[i]["received_at"]) for i in decision.evidence)
        else:
            received = float(state["first_received_at"])
        alerted_at = time.time()
        return {
            "alert_id": str(uuid.uuid5(_ALERT_NAMESPACE, f"{study_uid}/{model_version}/{kind}")),
            "kind": kind,
            "study_instance_uid": study_uid,
            "series_instance_uid": state.get("series_instance_uid", ""),
            "accession_number": state.get("accession_number", ""),
            "calling_ae": state.get("calling_ae", ""),
            "model_version": model_version,
            "study_rule": rule.describe(),
            "probabilities": probabilities,
            "scores": decision.scores,
            "thresholds": dict(rule.thresholds),
            "positive": decision.positive,
            "positive_slices": positive_slices,
            "slices_scored": len(scored),
            "slices_failed": len(records) - len(scored),
            # False when a slice could not be scored: "not positive" is then not "negative".
            "complete": len(records) == len(scored),
            "received_at": received,
            "alerted_at": alerted_at,
            "latency_seconds": round(alerted_at - received, 6),
        }


def _neighbour_number(record: dict[str, Any]) -> float | None:
    """The number the rule orders a slice by (ich.decision: consecutive numbers are neighbours).
    A classic slice: its InstanceNumber. A frame of a multi-frame CT: none, so its series is
    ordered by the z its Plane Position functional group gave (PS3.3 C.7.6.16.2.3): frame
    numbers follow acquisition, not necessarily space (several stacks, reversed or interleaved
    frames), and the whole object arrives at once, so no gap can be a frame still in flight."""
    if record.get("frame_number") is not None:
        return None
    return record.get("instance_number")


def _reading_order(record: dict[str, Any]) -> tuple:
    """Slices listed as a reader scrolls a series: instance number, then z."""
    return (record.get("series_instance_uid") or "", record.get("instance_number") or 0,
            record.get("frame_number") or 0, record.get("slice_position") or 0.0,
            record["sop_instance_uid"])
