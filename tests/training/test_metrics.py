"""Metrics and thresholds on hand-made predictions whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ich.labels import DEFAULT_THRESHOLDS, LABELS
from training import evaluate


def test_weighted_log_loss_matches_a_hand_computed_value():
    # Two images; every subtype predicted 0.5 (ln 2 each whatever the truth), `any` 0.8 on the
    # positive image and 0.1 on the negative one.
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], float)
    p = np.array([[0.5] * 5 + [0.8], [0.5] * 5 + [0.1]])
    any_loss = -(math.log(0.8) + math.log(0.9)) / 2            # 0.164252
    expected = (5 * math.log(2) + 2 * any_loss) / 7            # any weighs 2 of 7
    assert expected == pytest.approx(0.542034, abs=1e-6)
    assert evaluate.weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    assert evaluate.label_log_loss(y, p)[-1] == pytest.approx(any_loss, rel=1e-12)


def test_weighted_log_loss_agrees_with_sklearn_per_label_and_clips_certainty():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    y = (rng.random((200, 6)) < 0.3).astype(float)
    p = rng.random((200, 6))
    per_label = [log_loss(y[:, i], p[:, i], labels=[0, 1]) for i in range(6)]
    assert evaluate.label_log_loss(y, p) == pytest.approx(per_label, rel=1e-9)
    assert evaluate.weighted_log_loss(y, p) == pytest.approx(
        (sum(per_label[:5]) + 2 * per_label[5]) / 7, rel=1e-9)
    wrong_and_certain = evaluate.weighted_log_loss(np.ones((1, 6)), np.zeros((1, 6)))
    assert wrong_and_certain == pytest.approx(-math.log(1e-15))   # finite: clipped like RSNA


def test_prevalence_baseline_is_the_entropy_of_each_label():
    y = np.zeros((10, 6))
    y[:2, 5] = 1        # any: prevalence 0.2; subtypes all negative (loss ~0)
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert evaluate.prevalence_log_loss(y) == pytest.approx(2 * h / 7, abs=1e-9)


@pytest.mark.parametrize("target, expected", [(1.0, 0.2), (0.75, 0.3), (0.5, 0.8), (0.25, 0.9)])
def test_threshold_is_the_highest_with_recall_at_least_the_target(target, expected):
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.25, 0.1])
    t = evaluate.choose_threshold(y, p, target)
    assert t == pytest.approx(expected)
    assert evaluate.operating_point(y, p, t)["recall"] >= target
    assert evaluate.operating_point(y, p, np.nextafter(t, 1))["recall"] < target   # highest


def test_threshold_survives_float_rounding_of_target_times_positives():
    # 0.95 * 20 is not exactly 19 in floating point; 19 of 20 positives must suffice.
    y = np.ones(20)
    p = np.linspace(0.99, 0.04, 20)        # distinct, descending
    assert evaluate.choose_threshold(y, p, 0.95) == pytest.approx(p[18])


def test_threshold_with_tied_scores_and_without_positives():
    assert evaluate.choose_threshold(np.array([1, 1, 1]), np.array([0.5, 0.5, 0.4]), 0.5) == 0.5
    assert evaluate.choose_threshold(np.array([0, 0]), np.array([0.5, 0.4]), 0.9) is None


def test_choose_thresholds_defaults_and_per_label_choice():
    assert evaluate.choose_thresholds(None, None, None) == DEFAULT_THRESHOLDS
    assert DEFAULT_THRESHOLDS["any"] == 0.15
    y = np.zeros((4, 6))
    y[:2, 5] = 1                       # `any` has positives; the subtypes have none
    p = np.full((4, 6), 0.3)
    p[:, 5] = [0.7, 0.6, 0.65, 0.1]
    chosen = evaluate.choose_thresholds(y, p, 0.95)
    assert chosen["any"] == pytest.approx(0.6)
    assert {k: chosen[k] for k in LABELS[:5]} == {k: DEFAULT_THRESHOLDS[k] for k in LABELS[:5]}


def test_operating_point_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.1, 0.7, 0.2, 0.1, 0.0, 0.3])
    # at 0.5: TP 2, FN 1, FP 1, TN 4
    assert evaluate.operating_point(y, p, 0.5) == pytest.approx(
        {"recall": 2 / 3, "precision": 2 / 3, "specificity": 4 / 5})
    assert evaluate.operating_point(y, p, 0.95)["precision"] is None   # nothing predicted positive


def test_metrics_report_every_label_and_undefined_auc_as_none(tmp_path):
    rng = np.random.default_rng(1)
    y = (rng.random((50, 6)) < 0.3).astype(float)
    y[:, 0] = 0                                      # epidural: one class only
    p = np.clip(y * 0.6 + rng.random((50, 6)) * 0.4, 0, 1)
    m = evaluate.metrics(y, p, DEFAULT_THRESHOLDS)
    assert set(m["per_label"]) == set(LABELS)
    assert m["per_label"]["epidural"]["auc"] is None
    assert m["per_label"]["any"]["auc"] == pytest.approx(1.0)   # positives all score ≥ 0.6 > negatives' max 0.4
    assert {"log_loss", "auc", "threshold", "recall", "precision", "specificity"} <= set(m["per_label"]["any"])
    assert m["weighted_log_loss"] < m["prevalence_log_loss"]
    png = evaluate.plot_precision_recall(y, p, DEFAULT_THRESHOLDS, tmp_path / "pr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_refuses_a_model_no_better_than_the_prevalence():
    rng = np.random.default_rng(5)
    y = (rng.random((400, 6)) < 0.2).astype(np.float32)
    y[:, -1] = y[:, :5].max(axis=1)
    learned = np.clip(y * 0.85 + rng.random(y.shape) * 0.1 + 0.02, 0, 1)
    good = evaluate.verdict(evaluate.metrics(y, learned, DEFAULT_THRESHOLDS))
    assert good["passed"] and good["reasons"] == [] and good["loss_ratio"] < 0.5
    prevalence = np.broadcast_to(y.mean(axis=0), y.shape)
    flat = evaluate.verdict(evaluate.metrics(y, prevalence + rng.normal(0, 1e-3, y.shape), DEFAULT_THRESHOLDS))
    assert not flat["passed"] and "prevalence-only" in flat["reasons"][0] and len(flat["reasons"]) == 2
    # Better than the prevalence in log loss but blind on `any`: refused too.
    blind = learned.copy()
    blind[:, -1] = rng.random(len(y))
    result = evaluate.metrics(y, blind, DEFAULT_THRESHOLDS)
    assert result["per_label"]["any"]["auc"] < evaluate.MIN_ANY_AUC
    assert not evaluate.verdict(result)["passed"]



def test_verdict_needs_enough_held_out_slices_to_tell_learning_from_luck():
    """The CI incident: random labels, one 9-slice test study, AUC and loss ratio good by luck."""
    y = np.zeros((9, 6), np.float32)
    y[:3, -1] = y[:3, 4] = 1
    lucky = np.full(y.shape, 0.02, np.float32)
    lucky[:, -1] = lucky[:, 4] = [0.6, 0.5, 0.3, 0.35, 0.2, 0.1, 0.1, 0.1, 0.05]
    result = evaluate.metrics(y, lucky, DEFAULT_THRESHOLDS)
    assert result["per_label"]["any"]["auc"] >= evaluate.MIN_ANY_AUC
    assert result["weighted_log_loss"] <= evaluate.MAX_LOSS_RATIO * result["prevalence_log_loss"]
    small = evaluate.verdict(result)
    assert not small["passed"] and small["reasons"] == [
        "too few held-out slices to judge: 3 any-positive and 6 negative (need >= 10 of each: "
        "train on more studies)"]
    # The same separation on ten times the slices: passed.
    big = evaluate.verdict(evaluate.metrics(np.tile(y, (10, 1)), np.tile(lucky, (10, 1)), DEFAULT_THRESHOLDS))
    assert big["passed"], big["reasons"]
