"""Study-level evaluation and the choice of rule and threshold, on hand-made studies."""
from __future__ import annotations

import numpy as np
import pytest

from ich.decision import StudyRule
from ich.labels import ANY, DEFAULT_THRESHOLDS, LABELS
from training import studies
from training.data import Headers


def make_set(specs):
    """specs: (any probabilities in instance order, bleeding instance indices) per study."""
    labels, probs, study_uids, series, positions, instances = [], [], [], [], [], []
    for s, (p, bleeding) in enumerate(specs):
        for i, value in enumerate(p):
            y = np.zeros(len(LABELS))
            if i in bleeding:
                y[LABELS.index("subdural")] = y[-1] = 1
            labels.append(y)
            probs.append([value] * len(LABELS))
            study_uids.append(f"1.2.{s}")
            series.append(f"1.2.{s}.1")
            positions.append(-5.0 * i)          # feet first: z falls as instances rise
            instances.append(i + 1)
    headers = Headers(np.array(study_uids), np.array(series), np.array(positions, float),
                      np.array(instances, float))
    # Rows shuffled, as the input pipeline may deliver them.
    order = np.random.default_rng(0).permutation(len(labels))
    return studies.StudySet.build(np.array(labels)[order], np.array(probs)[order], headers.take(order))


def spiky_normals(n, rng):
    """Normal studies with one isolated high slice: what a per-slice threshold pages on."""
    out = []
    for _ in range(n):
        p = list(rng.uniform(0.01, 0.1, 20))
        p[int(rng.integers(2, 18))] = rng.uniform(0.6, 0.95)
        out.append((p, set()))
    return out


def bleeds(n, rng):
    """Bleeds over 4 adjacent slices, two of which the model sees clearly."""
    out = []
    for _ in range(n):
        p = list(rng.uniform(0.01, 0.1, 20))
        start = int(rng.integers(3, 14))
        p[start:start + 4] = [0.3, rng.uniform(0.7, 0.99), rng.uniform(0.7, 0.99), 0.4]
        out.append((p, set(range(start, start + 4))))
    return out


def test_chooses_the_neighbour_rule_when_normals_have_isolated_spikes():
    rng = np.random.default_rng(1)
    calibration = make_set(spiky_normals(20, rng) + bleeds(20, rng))
    rule, rows = studies.choose_rule(calibration, 0.95)
    assert rule.name == "consecutive" and rule.k == 2
    by_name = {r["rule"]: r for r in rows}
    assert set(by_name) == {"max", "consecutive-2", "consecutive-3", "topk-2", "topk-3"}
    assert by_name["consecutive-2"]["specificity"] == 1.0 and by_name["max"]["specificity"] <= 0.8
    for r in rows:
        assert r["recall"] >= 0.95 and r["tp"] + r["fn"] == 20 and r["tn"] + r["fp"] == 20
    # On fresh studies of the same kind the choice holds up.
    test = make_set(spiky_normals(30, rng) + bleeds(30, rng))
    m = studies.study_metrics(test, rule)
    assert m["studies"] == 60 and m["positive_studies"] == 30 and m["normal_studies"] == 30
    assert m["fp"] == 0 and m["false_alerts_per_100_normal"] == 0.0 and m["auc"] == 1.0
    assert m["subtype_auc"]["subdural"] == 1.0 and m["subtype_auc"]["epidural"] is None
    # Subtypes: Youden's J on calibration (every bleed here is subdural), named only on alerts.
    assert (m["per_label"]["subdural"]["tp"], m["per_label"]["subdural"]["fp"]) == (30, 0)
    assert rule.thresholds["epidural"] == DEFAULT_THRESHOLDS["epidural"]   # no epidural to learn from
    assert studies.study_metrics(test, StudyRule("max", 1, rule.thresholds))["fp"] > 10


def test_threshold_sits_mid_gap_below_the_bleeds_the_target_recall_keeps():
    rng = np.random.default_rng(2)
    calibration = make_set(bleeds(20, rng) + spiky_normals(5, rng))
    rule, rows = studies.choose_rule(calibration, 0.9, candidates=[("max", 1)], confidence=None,
                                     placement=0.5)
    scores = calibration.scores(rule)[:, -1]
    truth = calibration.truth()[:, -1] > 0
    t = rule.thresholds[ANY]
    # t_hi: the ⌈0.9 · (20 + 1)⌉ = 19th highest bleed (expected recall on new studies ≥ 0.9);
    # the threshold lies mid-way (in logits) between t_hi and the highest normal study below
    # it, so the same normals stay silent.
    t_hi = np.sort(scores[truth])[::-1][18]
    normal_below = scores[~truth & (scores < t_hi)].max()
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert logit(t) == pytest.approx((logit(t_hi) + logit(normal_below)) / 2)
    assert rows[0]["gap_logit"] == pytest.approx(logit(t_hi) - logit(normal_below), abs=1e-4)
    assert np.sum(scores[truth] >= t) >= 19
    assert np.sum(scores[~truth] >= t) == np.sum(scores[~truth] >= t_hi)
    # Placed lower in the gap (recall first): the same calibration figures, a lower threshold.
    low, rows = studies.choose_rule(calibration, 0.9, candidates=[("max", 1)], placement=0.3)
    assert logit(low.thresholds[ANY]) == pytest.approx(logit(normal_below)
                                                       + 0.3 * (logit(t_hi) - logit(normal_below)))
    assert normal_below < low.thresholds[ANY] < t and rows[0]["gap_placement"] == 0.3
    assert np.sum(scores[~truth] >= low.thresholds[ANY]) == np.sum(scores[~truth] >= t_hi)
    assert low.thresholds["subdural"] == rule.thresholds["subdural"]        # subtypes: midpoint
    with pytest.raises(ValueError, match="placement"):
        studies.choose_rule(calibration, 0.9, candidates=[("max", 1)], placement=1.5)
    default, rows = studies.choose_rule(calibration, 0.9, candidates=[("max", 1)])
    assert rows[0]["gap_placement"] == studies.GAP_PLACEMENT
    assert logit(default.thresholds[ANY]) == pytest.approx(
        logit(normal_below) + studies.GAP_PLACEMENT * (logit(t_hi) - logit(normal_below)))
    # No normal study below t_hi: t_hi itself.
    only_bleeds = make_set(bleeds(10, rng))
    alone, _ = studies.choose_rule(only_bleeds, 0.9, candidates=[("max", 1)], confidence=None)
    assert alone.thresholds[ANY] == np.sort(only_bleeds.scores(alone)[:, -1])[::-1][9]   # ⌈0.9 · 11⌉
    # Without a target (or without bleeds), the defaults and `max`.
    plain, rows = studies.choose_rule(calibration, None)
    assert (plain.name, dict(plain.thresholds), rows) == ("max", DEFAULT_THRESHOLDS, [])


def test_floors_threshold_leaves_the_most_room_above_both_floors_mid_way_between_scores():
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    # Bleeds 0.9, 0.8, 0.7, 0.6; normals 0.1, 0.2, 0.3, 0.65. Alerting at >= 0.6 keeps every
    # bleed and silences 3 of 4 normals: room min(1 - 0.75, 0.75 - 0.5) = 0.25, and nothing
    # else gets it; any t in (0.3, 0.6] alerts the same studies, so t sits mid-way in logits.
    y, s = [1, 1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.65]
    t, room = studies.floors_threshold(y, s, 0.75, 0.5)
    assert room == 0.25 and logit(t) == pytest.approx((logit(0.3) + logit(0.6)) / 2)
    assert studies.floors_threshold([1, 1], [0.5, 0.7], 0.9, 0.8) == (None, 0.0)
    rng = np.random.default_rng(4)
    for _ in range(10):          # against every threshold that matters, on overlapping scores
        y = np.r_[np.ones(30), np.zeros(40)] > 0
        s = np.r_[rng.beta(4, 2, 30), rng.beta(2, 4, 40)]
        t, room = studies.floors_threshold(y, s, 0.95, 0.85)
        room_at = lambda u: min(np.mean(s[y] >= u) - 0.95, np.mean(s[~y] < u) - 0.85)  # noqa: E731
        grid = np.unique(np.r_[s, np.nextafter(s, 2.0), 1.0])
        assert room == pytest.approx(max(room_at(u) for u in grid), abs=1e-4)
        assert room_at(t) == pytest.approx(room, abs=1e-4)
        assert not np.isin(t, s), "between scores, never on one"
    # Through choose_rule: the `any` threshold is the floors' one; the row records them.
    calibration = make_set(bleeds(20, rng) + spiky_normals(8, rng))
    rule, rows = studies.choose_rule(calibration, 0.95, candidates=[("max", 1)], floors=(0.95, 0.85))
    y, s = calibration.truth()[:, -1], calibration.scores(rule)[:, -1]
    assert rule.thresholds[ANY] == pytest.approx(studies.floors_threshold(y, s, 0.95, 0.85)[0])
    assert rows[0]["floors"] == [0.95, 0.85] and "gap_placement" not in rows[0]
    assert rows[0]["floor_room"] == studies.floors_threshold(y, s, 0.95, 0.85)[1]


def test_recall_confidence_holds_the_target_on_new_studies_not_only_on_average():
    # The k-th highest of P calibration bleeds, replayed 4,000 times on scores whose coverage
    # is known exactly (uniform: a threshold t keeps 1 - t of all new bleeds).
    rng = np.random.default_rng(3)
    draws = np.sort(rng.uniform(size=(4000, 80)), axis=1)[:, ::-1]
    for confidence, k, stated in ((None, 77, 0.5716), (0.9, 79, 0.9139)):
        assert studies.conformal_rank(80, 0.95, confidence) == (k, stated)
        held = np.mean(1 - draws[:, k - 1] >= 0.95)
        assert held == pytest.approx(stated, abs=0.02), "the stated confidence is what happens"
    # Too few bleeds to be that sure: the weakest is kept and the confidence says so.
    assert studies.conformal_rank(30, 0.95, 0.9) == (30, 0.7854)
    rng = np.random.default_rng(4)
    calibration = make_set(bleeds(40, rng) + spiky_normals(10, rng))
    rule, rows = studies.choose_rule(calibration, 0.95, candidates=[("max", 1)], confidence=0.9)
    assert rows[0]["recall_confidence"] == studies.conformal_rank(40, 0.95, 0.9)[1] == 0.8715
    assert rows[0]["tp"] == 40, "k = P: every calibration bleed alerts"
    marginal, rows = studies.choose_rule(calibration, 0.95, candidates=[("max", 1)])   # default
    assert rows[0]["tp"] == 39 and rows[0]["recall_confidence"] == 0.6009
    assert marginal.thresholds[ANY] > rule.thresholds[ANY]


def test_alert_delay_replays_arrival_in_instance_order():
    # Bleed on instances 5–8 (indices 4–7); at 0.5, max fires at index 6 (0.6) and
    # consecutive-2 at index 7 (0.6 and 0.9 are the first two neighbours >= 0.5).
    p = [0.05] * 4 + [0.3, 0.45, 0.6, 0.9] + [0.05] * 4
    one = make_set([(p, {4, 5, 6, 7})])
    r = StudyRule("consecutive", 2, {**DEFAULT_THRESHOLDS, ANY: 0.5})
    assert studies.alert_delay(one, r) == {"studies": 1, "median": 3.0, "p95": 3.0, "max": 3}
    assert studies.alert_delay(one, StudyRule("max", 1, r.thresholds))["median"] == 2.0
    early = StudyRule("max", 1, {**DEFAULT_THRESHOLDS, ANY: 0.25})
    assert studies.alert_delay(one, early)["median"] == 0.0
    assert studies.alerting_studies(one, r) == ["1.2.0"]


def test_study_curves_plot(tmp_path):
    rng = np.random.default_rng(3)
    s = make_set(spiky_normals(6, rng) + bleeds(6, rng))
    path = studies.plot_study_curves(s, StudyRule("consecutive", 2, {**DEFAULT_THRESHOLDS, ANY: 0.5}),
                                     tmp_path / "study.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rule_specs():
    assert studies.candidates("auto") == studies.CANDIDATES
    assert studies.candidates("topk-3") == (("topk", 3),) and studies.candidates("max") == (("max", 1),)
    for bad in ("median", "consecutive-0", "topk-x"):
        with pytest.raises(ValueError):
            studies.candidates(bad)


def test_errors_by_an_attribute_count_false_alerts_and_misses_per_range():
    """errors_by: each study falls in the range of its attribute; a normal that alerts and a
    bleed that does not are counted there; a study without attributes is only counted."""
    quiet, spike, bleed, faint = [0.05] * 4, [0.05, 0.9, 0.05, 0.05], [0.1, 0.8, 0.9, 0.1], [0.1, 0.2, 0.3, 0.1]
    specs = [(quiet, []), (quiet, []), (spike, []), (spike, []), (bleed, [1, 2]), (faint, [1, 2]), (quiet, [])]
    s = make_set(specs)
    rule = StudyRule("max", 1, {**DEFAULT_THRESHOLDS, ANY: 0.5})
    streaks = {"1.2.0": 5.0, "1.2.1": 40.0, "1.2.2": 35.0, "1.2.3": 45.0, "1.2.4": 10.0, "1.2.5": 44.0}
    attributes = {uid: {"streaks": v, "slice_mm": 5.0 if v < 30 else 7.0} for uid, v in streaks.items()}
    result = studies.errors_by(s, rule, attributes)
    assert result["studies_matched"] == 6 and result["studies_unmatched"] == 1
    low, middle, high = result["axes"]["streaks"]      # 5–18.3, 18.3–31.7, 31.7–45
    assert (low["from"], high["to"]) == (5.0, 45.0)
    assert (low["normal_studies"], low["false_alerts"], low["bleeding_studies"], low["missed"]) == (1, 0, 1, 0)
    assert middle["normal_studies"] == middle["bleeding_studies"] == 0
    assert (high["normal_studies"], high["false_alerts"], high["bleeding_studies"], high["missed"]) == (3, 2, 1, 1)
    thin, thick = result["axes"]["slice_mm"]           # two values: one range each
    assert (thin["from"], thin["to"], thick["from"]) == (5.0, 5.0, 7.0)
    assert thick["false_alerts"] == 2 and thick["missed"] == 1 and thin["false_alerts"] == thin["missed"] == 0
    m = studies.study_metrics(s, rule)             # the same decisions as the study figures
    assert sum(b["false_alerts"] for b in result["axes"]["streaks"]) == m["fp"]
    assert sum(b["missed"] for b in result["axes"]["streaks"]) == m["fn"]


def test_specificity_threshold_silences_the_conformal_share_of_new_normals():
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    # 19 normals at 0.01..0.19: k = ceil(0.9 * 20) = 18, so the 18th lowest (0.18) is the last
    # silent one and t sits mid-way in logits between it and the 19th (0.19).
    s = np.arange(1, 20) / 100
    t = studies.specificity_threshold(s[::-1], 0.9)          # order does not matter
    assert logit(t) == pytest.approx((logit(0.18) + logit(0.19)) / 2)
    assert np.mean(s < t) == 18 / 19
    assert studies.specificity_threshold([], 0.9) is None
    # Ties with the k-th lowest stay silent with it: never a threshold on a score.
    tied = studies.specificity_threshold([0.1] * 5 + [0.3] * 15, 0.9)
    assert 0.3 < tied and 0.1 < studies.specificity_threshold([0.1] * 19 + [0.3], 0.9) < 0.3
    # Above the highest normal where the target asks for every one to be silent.
    assert studies.specificity_threshold([0.2, 0.4], 0.9) > 0.4
    # Its promise: over many draws, new normals from the same site are silent at the target
    # rate on average (split-conformal), a little above it, never well below.
    rng = np.random.default_rng(0)
    silent = [np.mean(rng.beta(2, 5, 1000) < studies.specificity_threshold(rng.beta(2, 5, 60), 0.9))
              for _ in range(400)]
    assert 0.9 <= np.mean(silent) <= 0.92


def test_band_threshold_keeps_a_plausible_card_and_moves_an_implausible_one_to_the_nearer_end():
    normals = np.arange(1, 100) / 100                   # 99 normals at 0.01..0.99
    low, high = studies.specificity_threshold(normals, 0.88), studies.specificity_threshold(normals, 0.93)
    assert 0.87 < low < high < 0.94
    assert studies.band_threshold(normals, 0.905, 0.88, 0.93) == 0.905        # inside: kept
    assert studies.band_threshold(normals, 0.50, 0.88, 0.93) == low           # pages: raised
    assert studies.band_threshold(normals, 0.99, 0.88, 0.93) == high          # too deaf: lowered
    # A band of zero width is the point, whatever the card said.
    for card in (0.2, 0.9, 0.999):
        assert studies.band_threshold(normals, card, 0.9, 0.9) == studies.specificity_threshold(normals, 0.9)
    assert studies.band_threshold([], 0.5, 0.88, 0.93) is None
    with pytest.raises(ValueError, match="low <= high"):
        studies.band_threshold(normals, 0.5, 0.93, 0.88)
