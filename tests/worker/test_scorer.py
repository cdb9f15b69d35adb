"""The scoring hot path step by step, in-process, with the production InceptionV3 at 96×96
(tests.modelfactory.SIZE); the refused and the flip-averaged artifact are LOOP_ENGINE graphs."""
from __future__ import annotations

import numpy as np
import pytest
import redis
from pydicom.uid import generate_uid

from ich import keys
from ich.labels import LABELS
from ich.model import ArtifactError
from ich.queue import SliceMeta, SliceQueue
from ich.settings import Settings
from tests.ctfactory import ct_dataset, enhanced_ct, lesion_hu, to_bytes
from tests.modelfactory import LOOP_ENGINE, SIZE, random_inception
from worker.scoring import Scorer
from worker.study import SliceResult


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def redis_url(redis_server):
    """The session's Redis without the per-test flush: studies here have unique UIDs."""
    return redis_server.url


@pytest.fixture(scope="module")
def scorer(redis_url, inception_dir):
    settings = Settings.from_env({"ICH_REDIS_URL": redis_url, "ICH_THRESHOLD_EPIDURAL": "0.3"})
    return Scorer(settings, redis.Redis.from_url(redis_url), inception_dir)


def queue_slices(redis_url: str, blobs: list[bytes]) -> list[SliceMeta]:
    queue = SliceQueue(redis.Redis.from_url(redis_url), 1000, 600)
    study, series = generate_uid(), generate_uid()
    metas = [SliceMeta(study, series, generate_uid(), instance_number=i) for i in range(len(blobs))]
    for blob, meta in zip(blobs, metas):
        queue.enqueue(blob, meta)
    return metas


def test_model_card_and_thresholds_are_applied(scorer):
    assert scorer.size == SIZE and scorer.version == "test-inception-1"
    assert scorer.thresholds["any"] == 0.15 and scorer.thresholds["epidural"] == 0.3


def test_a_model_that_failed_its_quality_check_is_refused_unless_forced(redis_url, tmp_path):
    failed = random_inception(tmp_path / "models", "failed-1", status="failed", engine=LOOP_ENGINE)
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ArtifactError, match="quality check.*any AUC 0.500"):
        Scorer(Settings.from_env({"ICH_REDIS_URL": redis_url}), client, failed)
    forced = Scorer(Settings.from_env({"ICH_REDIS_URL": redis_url, "ICH_ALLOW_FAILED_MODEL": "1"}),
                    client, failed)
    assert forced.version == "failed-1"


def test_a_flip_averaged_artifact_is_served_with_the_plain_models_weights(redis_url, tmp_path):
    """`--flip-average`: the artifact scores each slice with its mirror, averaging the logits;
    its weights are the plain model's, in the same order. It loads in a process that never
    built one (the mirror layer is registered by `ich.model.load_artifact`) and serves a slice
    and its mirror alike."""
    import subprocess
    import sys

    import keras

    from ich.model import build_model

    folder = random_inception(tmp_path / "models", "flip-1", flip_average=True, engine=LOOP_ENGINE)
    served = Scorer(Settings.from_env({"ICH_REDIS_URL": redis_url}), redis.Redis.from_url(redis_url), folder)
    x = np.random.default_rng(5).random((3, SIZE, SIZE, 3), dtype=np.float32)
    mirrored = x[:, :, ::-1].copy()
    p = served.predict(x)
    np.testing.assert_allclose(served.predict(mirrored), p, atol=1e-6)
    plain = build_model(LOOP_ENGINE, SIZE)
    plain.set_weights(served.model.get_weights())
    logit = lambda q: np.log(q / (1 - q))   # noqa: E731
    halves = (logit(np.asarray(plain(x, training=False))) + logit(np.asarray(plain(mirrored, training=False)))) / 2
    np.testing.assert_allclose(logit(p), halves, atol=1e-4)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; from ich.model import load_artifact; "
            "m, _ = load_artifact(sys.argv[1]); np.save(sys.argv[2], np.asarray(m(np.load(sys.argv[3]), training=False)))")
    subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "p.npy"), str(tmp_path / "x.npy")],
                   check=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), p, atol=1e-5)
    assert isinstance(served.model.get_layer("mirror"), keras.layers.Layer)


def test_an_ensemble_artifact_is_served_as_the_mean_logit_of_its_members(redis_url, tmp_path):
    """`training.ensemble`'s artifact: a worker loads and scores it like any model."""
    from ich.model import ModelCard, load_artifact, save_artifact
    from tests.modelfactory import blood_detector
    from training.ensemble import build_ensemble

    members = [load_artifact(blood_detector(tmp_path / "m", f"d{k}", min_pixels=k))[0] for k in (2.5, 12.0)]
    x = np.random.default_rng(6).random((3, SIZE, SIZE, 3), dtype=np.float32)
    x[0, 20:44, 20:44, 0] = 0.95
    clipped = [np.clip(np.asarray(m(x, training=False), np.float64), 1e-7, 1 - 1e-7) for m in members]
    logits = [np.log(q) - np.log1p(-q) for q in clipped]      # the layer bounds each member's say
    model, _ = build_ensemble(members, SIZE)
    folder = save_artifact(model, ModelCard(version="ens-w", engine="test-detector + test-detector",
                                            input_size=SIZE), tmp_path / "models")
    served = Scorer(Settings.from_env({"ICH_REDIS_URL": redis_url}), redis.Redis.from_url(redis_url), folder)
    p = served.predict(x).astype(np.float64)
    np.testing.assert_allclose(np.log(p) - np.log1p(-p), (logits[0] + logits[1]) / 2, atol=1e-3)


def test_pre_process_decodes_good_slices_and_fails_bad_ones_alone(scorer, redis_url):
    good = [to_bytes(ct_dataset(lesion_hu(64, seed=i))) for i in range(3)]
    metas = queue_slices(redis_url, [good[0], b"\x00garbage", good[1], good[2]])
    redis.Redis.from_url(redis_url).delete(keys.slice_bytes(metas[3].token))  # expired bytes
    images, pending, failed = scorer.pre_process(metas)
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.float32
    assert [(r.meta.instance_number, r.frame) for r in pending] == [(0, None), (2, None)]
    assert [(f.meta.instance_number, f.error) for f in failed] == [(1, "undecodable"), (3, "expired")]


def test_predict_is_one_compiled_function_for_every_batch_size(scorer):
    rng = np.random.default_rng(0)
    for n in (1, 3, 8, 5):
        out = scorer.predict(rng.random((n, SIZE, SIZE, 3), dtype=np.float32))
        assert out.shape == (n, len(LABELS)) and ((0 <= out) & (out <= 1)).all()
    assert scorer._forward.experimental_get_tracing_count() == 1
    # Batched and one-by-one give the same answer (inference-mode BatchNorm, no batch coupling).
    batch = rng.random((4, SIZE, SIZE, 3), dtype=np.float32)
    np.testing.assert_allclose(scorer.predict(batch),
                               np.concatenate([scorer.predict(x[None]) for x in batch]), atol=1e-5)


def test_post_process_records_results_and_applies_thresholds(scorer, redis_url):
    metas = queue_slices(redis_url, [b"x", b"y"])
    probabilities = np.array([[0.2] * 5 + [0.9], [0.35, 0, 0, 0, 0, 0.1]], dtype=np.float32)
    touched = scorer.post_process([SliceResult(m) for m in metas], probabilities, failed=[])
    assert touched == [metas[0].study_instance_uid]
    client = redis.Redis.from_url(redis_url)
    assert client.hlen(keys.study_results(metas[0].study_instance_uid)) == 2
    assert client.exists(keys.slice_bytes(metas[0].token)) == 0  # bytes dropped once scored
    second = scorer.studies.results(metas[0].study_instance_uid)[1]
    assert second["positive"]["epidural"] and not second["positive"]["any"]  # 0.35 ≥ 0.3
    alert = scorer.studies.build_alert("first_positive", metas[0].study_instance_uid)
    assert alert["positive"]["any"] and alert["positive"]["epidural"]   # the card's rule: max
    assert alert["study_rule"] == {"name": "max", "k": 1} and alert["scores"]["any"] == pytest.approx(0.9)


def test_score_returns_the_studies_it_touched_and_due_alert_decides_them(scorer, redis_url):
    metas = queue_slices(redis_url, [to_bytes(ct_dataset(lesion_hu(64, seed=i))) for i in range(4)])
    touched = scorer.score(metas)
    assert touched == [metas[0].study_instance_uid]
    # An untrained network puts `any` near 0.5 > 0.15: the study is positive.
    alert = scorer.due_alert(touched[0])
    assert alert["kind"] == "first_positive" and alert["slices_scored"] == 4 and alert["positive"]["any"]


@pytest.mark.parametrize("enhanced", [False, True], ids=["legacy-converted", "enhanced"])
def test_a_multi_frame_ct_is_scored_per_frame_like_its_classic_twin(scorer, redis_url, enhanced):
    """Issue 15 part 2: each frame of an Enhanced / Legacy Converted Enhanced CT object is a
    slice: rescale and z from its functional groups, one result per frame keyed by frame
    number, the same probabilities as the classic slices it was made from. Forward passes
    stay within ICH_BATCH_MAX images however many frames an object brings."""
    study, series = generate_uid(), generate_uid()
    classic = []
    for i in range(5):
        ds = ct_dataset(lesion_hu(64, seed=i, bleed=i == 2))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
        classic.append(ds)
    multi = enhanced_ct(classic, enhanced=enhanced)
    twin, = queue_slices(redis_url, [to_bytes(multi)])
    singles = queue_slices(redis_url, [to_bytes(ds) for ds in classic])
    scorer.batch_max, before = 2, scorer.batch_max
    try:
        assert scorer.score([twin]) == [twin.study_instance_uid]
    finally:
        scorer.batch_max = before
    scorer.score(singles)
    frames = scorer.studies.results(twin.study_instance_uid)
    assert [r["frame_number"] for r in frames] == [1, 2, 3, 4, 5]
    assert [r["slice_position"] for r in frames] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert {r["sop_instance_uid"] for r in frames} == {twin.sop_instance_uid}
    expected = [r["probabilities"] for r in scorer.studies.results(singles[0].study_instance_uid)]
    for got, want in zip(frames, expected):
        assert got["probabilities"] == pytest.approx(want, abs=1e-5)
    alert = scorer.studies.build_alert("study_summary", twin.study_instance_uid)
    assert alert["slices_scored"] == 5 and alert["complete"]
    assert all("frame_number" in s for s in alert["positive_slices"])
