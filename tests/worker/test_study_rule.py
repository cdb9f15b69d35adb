"""The worker's streaming study decision against training's offline one, on the same
probabilities: StudyStore (real Redis) fed batch by batch, slices in any order, must fire
`first_positive` at the batch holding the slice `StudyRule.first_positive_index` names for that
arrival order, and its final verdict must be the one `training.studies` reports for the whole
study."""
from __future__ import annotations

import numpy as np
import pytest
import redis

from ich.decision import StudyRule
from ich.labels import ANY, DEFAULT_THRESHOLDS, LABELS
from ich.queue import SliceMeta
from training import studies as offline
from training.data import Headers
from worker.study import FIRST_POSITIVE, SliceResult, StudyStore


def random_study(rng, n):
    """Noise, sometimes a run of high slices, sometimes a lone spike; instance order = z order."""
    p = rng.uniform(0.0, 0.4, (n, len(LABELS)))
    if rng.random() < 0.5:
        start = int(rng.integers(0, max(1, n - 3)))
        p[start:start + int(rng.integers(1, 4)), :] = rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:
        p[int(rng.integers(0, n))] = rng.uniform(0.6, 1.0)
    return p


@pytest.mark.parametrize("name,k", [("max", 1), ("consecutive", 2), ("topk", 3)])
def test_streaming_and_offline_decide_alike(redis_url, name, k):
    rng = np.random.default_rng({"max": 1, "consecutive": 2, "topk": 3}[name])
    rule = StudyRule(name, k, {**DEFAULT_THRESHOLDS, ANY: 0.55, "subdural": 0.6})
    store = StudyStore(redis.Redis.from_url(redis_url), ttl_s=600)
    verdicts = []
    for s in range(25):
        n = int(rng.integers(3, 16))
        p = random_study(rng, n)
        uid, series = f"1.2.3.{name}.{s}", f"1.2.3.{name}.{s}.1"
        metas = [SliceMeta(uid, series, f"{uid}.{i}", instance_number=i + 1, slice_position=100.0 - 5 * i)
                 for i in range(n)]
        # Half the studies arrive out of order (a PACS forward, storescu +sd by file name).
        arrival = rng.permutation(n) if s % 2 else np.arange(n)
        metas, p = [metas[i] for i in arrival], p[arrival]
        # Streaming: random batch boundaries, the worker's decision after each batch.
        cuts = sorted(set(rng.integers(1, n, size=int(rng.integers(0, 4))).tolist()) | {n})
        fired_batch_end, start = None, 0
        for end in cuts:
            store.record([SliceResult(m, dict(zip(LABELS, map(float, row))))
                          for m, row in zip(metas[start:end], p[start:end])], rule, "v1")
            alert = store.build_alert(FIRST_POSITIVE, uid)
            if alert["positive"][ANY] and fired_batch_end is None:
                fired_batch_end = end
            start = end
        # Offline: the replay training and evaluation use, slice by slice in the same order.
        headers = Headers(np.array([uid] * n), np.array([series] * n),
                          np.array([m.slice_position for m in metas]),
                          np.array([float(m.instance_number) for m in metas]))
        study = offline.StudySet.build(np.zeros((n, len(LABELS))), p, headers)[0]
        index = rule.first_positive_index(study.slices())
        if index is None:
            assert fired_batch_end is None
        else:   # the alert fires with the batch that delivered that slice
            assert fired_batch_end == next(end for end in cuts if end > index)
        final = store.build_alert("study_summary", uid)
        bleed = final["scores"][ANY] >= rule.thresholds[ANY]
        assert final["positive"] == {label: bool(bleed and final["scores"][label] >= rule.thresholds[label])
                                     for label in LABELS}
        np.testing.assert_allclose([final["scores"][label] for label in LABELS],
                                   offline.StudySet([study]).scores(rule)[0])
        verdicts.append(final["positive"][ANY])
        assert final["positive"][ANY] == (index is not None)   # never contradicted at the end
    assert 0 < sum(verdicts) < len(verdicts)   # both verdicts occurred


def test_a_redelivered_copy_never_overwrites_the_recorded_result(redis_url):
    """Killed between `record` and the ack, a worker's message is delivered again; its bytes are
    gone, so the copy fails as `expired`. The first copy's probabilities must stay, or a study's
    only positive slice turns negative. A new receipt of the same instance (a resend) replaces
    the result."""
    store = StudyStore(redis.Redis.from_url(redis_url), ttl_s=600)
    rule = StudyRule("max", 1, {**DEFAULT_THRESHOLDS, ANY: 0.5})
    meta = SliceMeta("1.2.3.77", "1.2.3.77.1", "1.2.3.77.1.1", instance_number=1)
    store.record([SliceResult(meta, dict(zip(LABELS, [0.9] * 6)))], rule, "v1")
    store.record([SliceResult(meta, error="expired")], rule, "v1")   # the redelivered copy
    [result] = store.results("1.2.3.77")
    assert result["probabilities"][ANY] == 0.9 and "error" not in result
    assert store.build_alert("study_summary", "1.2.3.77")["positive"][ANY]
    resent = SliceMeta("1.2.3.77", "1.2.3.77.1", "1.2.3.77.1.1", instance_number=1)   # new token
    store.record([SliceResult(resent, dict(zip(LABELS, [0.1] * 6)))], rule, "v1")
    assert store.results("1.2.3.77")[0]["probabilities"][ANY] == 0.1


def test_frames_of_a_multi_frame_ct_are_neighbours_by_position_not_frame_number(redis_url):
    """Issue 15: frames are ordered by the z of their Plane Position for the study rule. An
    Enhanced CT whose frames interleave two stacks (frame numbers 1..6, z 0, 10, 20 then 5, 15,
    25) has its two bright frames 2 and 5 at z 10 and 15: neighbours in space, not in number.
    Under consecutive-2 the study alerts; ordered by frame number it would not."""
    store = StudyStore(redis.Redis.from_url(redis_url), ttl_s=600)
    rule = StudyRule("consecutive", 2, {**DEFAULT_THRESHOLDS, ANY: 0.5})
    uid = "1.2.3.88"
    meta = SliceMeta(uid, f"{uid}.1", f"{uid}.1.1", instance_number=1, slice_position=0.0)
    z = {1: 0.0, 2: 10.0, 3: 20.0, 4: 5.0, 5: 15.0, 6: 25.0}
    bright = {2, 5}                                            # z 10 and 15
    store.record([SliceResult(meta, dict(zip(LABELS, [0.9 if f in bright else 0.1] * 6)), frame=f,
                              position=z[f]) for f in z], rule, "v1")
    alert = store.build_alert("study_summary", uid)
    assert alert["positive"][ANY]
    # the same frames as classic slices numbered 1..6 in that order: frames 2 and 5 are apart
    other = "1.2.3.89"
    store.record([SliceResult(SliceMeta(other, f"{other}.1", f"{other}.1.{f}", instance_number=f,
                                        slice_position=z[f]),
                              dict(zip(LABELS, [0.9 if f in bright else 0.1] * 6))) for f in z], rule, "v1")
    assert not store.build_alert("study_summary", other)["positive"][ANY]
