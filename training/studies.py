"""Study-level evaluation: the figures that say whether an alert can be trusted (DESIGN §7).

Slice predictions are grouped into studies (`StudySet`), the shared study rule of
`ich.decision` turns each study into one score per label, and the figures are the ones a stroke
team would ask for: study AUC, recall, specificity and PPV at the operating point (with counts),
false alerts per 100 normal studies, per-subtype study AUC, and how many slices after the first
truly bleeding slice the alert fires, replaying arrival in instance order exactly as the worker
would see it.

The operating point is chosen on calibration studies (`choose_rule`): each candidate rule gets,
for `any`, a threshold at `GAP_PLACEMENT` (in logits) of the gap between the highest normal
study below the weakest bleeds the target study recall keeps on new studies (split-conformal,
`conformal_rank`: on average, or with a stated confidence) and those bleeds, and for each
subtype the midpoint around the threshold of best Youden's J (`study_threshold`); the
candidate with the best calibration specificity on `any` wins, then the one with the widest gap
(the most robust separation), then AUC, then the simpler rule. Figures are then reported on test
studies that chose nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ich.decision import SliceScore, StudyRule
from ich.labels import ANY, DEFAULT_THRESHOLDS, LABELS, SUBTYPES
from training.evaluate import _pyplot, auc, counts, logit, sigmoid

#: How sure the `any` threshold must be that recall on new studies reaches the target
#: (`conformal_rank`); None: on average (the expected-recall rank), whose confidence the card
#: reports (0.71 at 73 calibration bleeds). 0.9 was measured (docs/training.md, seed 2029): it
#: reaches for the weakest calibration bleed, an outlier, and on held-out sites gained 2 bleeds
#: for 15 normal studies alerted across five sets, so it is an option, not the default.
RECALL_CONFIDENCE: float | None = None

#: Where the `any` threshold sits within calibration's gap, in logits, from the highest normal
#: study below the ranked bleed (0, excluded: it would alert) to that bleed (1): 0.5 is the
#: max-margin midpoint; lower favours recall on a new site whose bleeds score lower than
#: calibration's (docs/training.md, "Placement within calibration's gap"). Subtypes keep 0.5.
GAP_PLACEMENT = 0.5

#: The rules measured by default; the first is the plain "max over slices".
CANDIDATES: tuple[tuple[str, int], ...] = (("max", 1), ("consecutive", 2), ("consecutive", 3),
                                            ("topk", 2), ("topk", 3))


def candidates(spec: str = "auto") -> tuple[tuple[str, int], ...]:
    """`auto` (every rule of CANDIDATES, the best on calibration wins) or one rule, `max`,
    `consecutive-K` or `topk-K`."""
    if spec == "auto":
        return CANDIDATES
    name, _, k = spec.partition("-")
    try:
        StudyRule(name, int(k or 1))
    except ValueError:
        raise ValueError(f"study rule must be auto, max, consecutive-K or topk-K, not {spec!r}") from None
    return ((name, int(k or 1)),)


@dataclass
class Study:
    uid: str
    labels: np.ndarray          # (n, 6) slice labels
    probabilities: np.ndarray   # (n, 6)
    series: np.ndarray          # (n,)
    positions: np.ndarray       # (n,) z, NaN where unknown
    instances: np.ndarray       # (n,) instance numbers, NaN where unknown

    @property
    def truth(self) -> np.ndarray:
        """(6,) the study has this label when any of its slices has it."""
        return self.labels.max(axis=0) if len(self.labels) else np.zeros(len(LABELS))

    def arrival(self) -> np.ndarray:
        """Row order in which a sender would transmit the study: instance number, then z."""
        key_i = np.where(np.isnan(self.instances), np.inf, self.instances)
        key_z = np.where(np.isnan(self.positions), np.inf, self.positions)
        return np.lexsort((key_z, key_i))

    def slices(self, order=None) -> list[SliceScore]:
        rows = range(len(self.labels)) if order is None else order
        known = lambda v: None if math.isnan(v) else float(v)  # noqa: E731
        return [SliceScore(self.probabilities[r], str(self.series[r]), known(self.positions[r]),
                           known(self.instances[r]), int(r)) for r in rows]


class StudySet(list):
    """The studies of one split, built from the slice predictions that exist (skipped slices
    are simply absent, as a failed slice is absent from the worker's study)."""

    @classmethod
    def build(cls, labels: np.ndarray, probabilities: np.ndarray, headers) -> "StudySet":
        groups: dict[str, list[int]] = {}
        for row, uid in enumerate(headers.studies):
            groups.setdefault(str(uid), []).append(row)
        out = cls()
        for uid, rows in groups.items():
            r = np.asarray(rows)
            out.append(Study(uid, np.asarray(labels)[r], np.asarray(probabilities)[r],
                             headers.series[r], headers.positions[r], headers.instances[r]))
        return out

    def truth(self) -> np.ndarray:
        return np.array([s.truth for s in self]).reshape(-1, len(LABELS))

    def scores(self, rule: StudyRule) -> np.ndarray:
        """(studies, 6) study scores under `rule`, every slice of each study present."""
        return np.array([rule.scores(s.probabilities, s.series, s.positions, s.instances)
                         for s in self]).reshape(-1, len(LABELS))


# ----------------------------------------------------------------------------- operating point


def conformal_rank(positives: int, target_recall: float, confidence: float | None) -> tuple[int, float]:
    """(k, the confidence reached): the k-th highest of P positive calibration scores is the
    threshold that keeps recall >= `target_recall` on new studies exchangeable with them.

    Its coverage (the share of new bleeds scoring at or above it) is Beta(k, P + 1 - k)
    distributed, so P(coverage >= R) = P(Binomial(P, R) <= k - 1). `confidence` None: the
    smallest k whose EXPECTED coverage k / (P + 1) is >= R (marginal split-conformal), which
    falls short of R about half the time (at P = 80, R = 0.95: k = 77, confidence 0.57).
    Otherwise the smallest k reaching `confidence` (training-conditional, Vovk 2012: at P = 80,
    k = 79, 0.91); where no k can (too few positives), k = P, the weakest, and the confidence
    returned says how sure that is (P = 30: 0.79)."""
    k = max(1, min(positives, math.ceil(target_recall * (positives + 1) - 1e-9)))
    if confidence is not None:
        while k < positives and _binomial_cdf(k - 1, positives, target_recall) < confidence:
            k += 1
    return k, round(_binomial_cdf(k - 1, positives, target_recall), 4)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exact (n is a count of calibration studies: small)."""
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1)))


def check_placement(placement: float | None) -> None:
    """A placement within calibration's gap is in (0, 1]: 0 would sit on the highest normal
    study below the ranked bleed, which would then alert; 1 is that bleed. None: the default."""
    if placement is not None and not 0 < placement <= 1:
        raise ValueError(f"the placement within calibration's gap must be in (0, 1] (towards 0: "
                         f"the highest normal study below the ranked bleed; 1: that bleed), "
                         f"not {placement}")


def study_threshold(y, scores, target_recall: float | None,
                    confidence: float | None = RECALL_CONFIDENCE,
                    placement: float = 0.5) -> tuple[float | None, float]:
    """The operating point of one label on calibration studies, and its gap in logits.

    With `target_recall` (the `any` alert), t_hi is the k-th highest score of the P positive
    calibration studies, k from `conformal_rank`: recall on new bleeding studies exchangeable
    with them is >= R on average (`confidence` None) or with probability `confidence`, not only
    on calibration (⌈R·P⌉ gave 0.93 on 30 test bleeds in one of three runs). Without a target
    (a subtype, which names the bleed of an alerted study rather than raising one), t_hi
    maximises Youden's J (recall + specificity − 1; ties: the lower threshold).
    Any threshold down to the highest normal study below t_hi keeps the same calibration figures, and calibration cannot tell them apart, but new studies can:
    t_hi sits on the weakest bleeds kept, so a slightly weaker bleed is missed. The threshold is
    therefore the midpoint, in logits, of that gap (a max-margin choice; measured on the first
    phantom model: t_hi kept 27 of 30 test bleeds, the midpoint 30 of 30, the same normals
    silent), or the point at `placement` of the way up from the normal (0) to t_hi (1).
    Returns (None, 0) without positive studies (or, for Youden, without normal ones).
    """
    check_placement(placement)
    y, scores = np.asarray(y) > 0.5, np.asarray(scores, np.float64)
    if target_recall is not None and y.any():
        positives = np.sort(scores[y])[::-1]
        k, _ = conformal_rank(len(positives), target_recall, confidence)
        high = float(positives[k - 1])
    elif target_recall is None and y.any() and not y.all():
        candidates = np.unique(scores)          # ascending: ties keep the lower threshold
        j = [np.mean(scores[y] >= t) - np.mean(scores[~y] >= t) for t in candidates]
        high = float(candidates[int(np.argmax(j))])
    else:
        high = None
    if high is None:
        return None, 0.0
    below = scores[~y & (scores < high)]
    if not below.size:
        return high, 0.0
    low = float(below.max())
    gap = float(logit(high) - logit(low))
    return float(sigmoid(logit(low) + placement * (logit(high) - logit(low)))), round(gap, 4)


def floors_threshold(y, scores, recall_floor: float,
                     specificity_floor: float) -> tuple[float | None, float]:
    """The threshold with the most room above both floors on these studies, and that room.

    It maximises min(recall − `recall_floor`, specificity − `specificity_floor`) and sits at the
    midpoint, in logits, of the thresholds that tie (between the scores around them, as
    `study_threshold` places its gap). For a site's own studies: `study_threshold` aims recall at
    its target exactly, so about half of new samples fall under it, while a site's normals leave
    room a floor can use (docs/training.md, "Calibrating on a site's own studies": the bar met
    more often on 26 of 27 model × site pairs). Not for training's studies, whose normals are nearly
    all silent at any threshold: it would sink to where a new site's normals alert. The room is
    negative where no threshold meets both floors here. (None, 0) without both kinds of study.
    """
    y, scores = np.asarray(y) > 0.5, np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return None, 0.0
    edges = np.unique(scores)                       # alerts are score >= t: t = edges[i] alerts
    bleeds, normals = np.sort(scores[y]), np.sort(scores[~y])   # what edges[i:] hold
    recall = 1 - np.searchsorted(bleeds, edges, "left") / len(bleeds)
    specificity = np.searchsorted(normals, edges, "left") / len(normals)
    room = np.append(np.minimum(recall - recall_floor, specificity - specificity_floor),
                     -recall_floor)                 # above every score: no alert at all
    best = np.flatnonzero(room == room.max())       # one run: recall falls, specificity rises
    low = float(edges[best[0] - 1]) if best[0] else 0.0
    high = float(edges[best[-1]]) if best[-1] < len(edges) else 1.0
    low, high = (min(max(v, 1e-7), 1 - 1e-7) for v in (low, high))
    return float(sigmoid((logit(low) + logit(high)) / 2)), round(float(room.max()), 4)


def specificity_threshold(normal_scores, specificity: float) -> float | None:
    """The `any` threshold at which, on average, a share `specificity` of a site's new normal
    studies stays silent, from the study scores of its normal studies alone (split-conformal,
    `conformal_rank` mirrored: the k-th lowest normal of N is silent for a new normal with
    expected probability k / (N + 1)). It sits at the midpoint, in logits, between that normal
    and the next higher score (normals tied with it stay silent too). For a site with no
    labelled bleeds: its normal studies tell where its scores sit, which a threshold carried
    from another site does not (docs/training.md, "Calibrating on a site's normal studies
    alone"). None without normal studies."""
    scores = np.sort(np.clip(np.asarray(normal_scores, np.float64), 1e-7, 1 - 1e-7))
    if not scores.size:
        return None
    k, _ = conformal_rank(len(scores), specificity, None)
    low = scores[k - 1]
    above = scores[scores > low]        # ties with the k-th stay silent with it
    high = above[0] if above.size else 1 - 1e-7
    return float(sigmoid((logit(low) + logit(high)) / 2))


def band_threshold(normal_scores, current: float, low: float, high: float) -> float | None:
    """`current` (the card's `any` threshold) where the site's normal studies say it keeps
    between `low` and `high` of new normals silent, else the nearer end: clip(current,
    T(low), T(high)) with T = `specificity_threshold`. A threshold chosen elsewhere is kept
    where the site's normals cannot tell it is wrong, so a right one is not traded for one
    sampled from ~70 normals (docs/training.md, H14); low == high is the point T(low). None
    without normal studies."""
    if not low <= high:
        raise ValueError(f"a specificity band needs low <= high, not [{low}, {high}]")
    floor, ceiling = specificity_threshold(normal_scores, low), specificity_threshold(normal_scores, high)
    if floor is None:
        return None
    return float(min(max(current, floor), ceiling))


def choose_rule(studies: StudySet, target_recall: float | None, candidates=CANDIDATES,
                confidence: float | None = RECALL_CONFIDENCE,
                placement: float | None = None,
                floors: tuple[float, float] | None = None) -> tuple[StudyRule, list[dict]]:
    """The rule and per-label study thresholds for `target_recall` (held on new studies with
    `confidence`), chosen on `studies` (calibration), the `any` threshold at `placement` of its
    gap (None: GAP_PLACEMENT), or, with `floors` (recall, specificity), where
    `floors_threshold` leaves the most room above both. Returns the rule and one row per
    candidate (what each achieved, and the confidence its `any` threshold reached), for the
    model card. Without a target, or without positive calibration studies, `max` with the
    default thresholds."""
    truth = studies.truth()
    if target_recall is None or not truth[:, -1].any():
        return StudyRule("max", 1, dict(DEFAULT_THRESHOLDS)), []
    rows, best, best_key = [], None, None
    _, reached = conformal_rank(int(truth[:, -1].sum()), target_recall, confidence)
    for rank, (name, k) in enumerate(candidates):
        rule = StudyRule(name, k)
        scores = studies.scores(rule)
        thresholds, gap = dict(DEFAULT_THRESHOLDS), 0.0
        for i, label in enumerate(LABELS):
            if label == ANY and floors is not None:     # gap: the room above both floors
                t, label_gap = floors_threshold(truth[:, i], scores[:, i], *floors)
            else:
                t, label_gap = study_threshold(truth[:, i], scores[:, i],
                                               target_recall if label == ANY else None, confidence,
                                               (GAP_PLACEMENT if placement is None else placement)
                                               if label == ANY else 0.5)
            if t is not None:
                thresholds[label] = float(min(max(t, 1e-7), 1 - 1e-7))
                gap = label_gap if label == ANY else gap
        rule = rule.with_thresholds(thresholds)
        point = _point(truth[:, -1], scores[:, -1] >= thresholds[ANY])
        a = auc(truth[:, -1], scores[:, -1])
        rows.append({"rule": str(rule), "threshold": thresholds[ANY], "auc": a, **point,
                     **({"floors": list(floors), "floor_room": gap} if floors is not None else
                        {"gap_logit": gap,
                         "gap_placement": GAP_PLACEMENT if placement is None else placement}),
                     "recall_confidence": None if floors is not None else reached})
        key = ((gap, a or 0.0, -rank) if floors is not None else   # the most room, or
               (point["specificity"] or 0.0, gap, a or 0.0, -rank))   # the quietest, widest gap
        if best_key is None or key > best_key:
            best, best_key = rule, key
    return best, rows


def _point(y, alerted) -> dict:
    """Study counts and rates; PPV is what a stroke team calls precision."""
    c = counts(y, alerted)
    return {"recall": c["recall"], "specificity": c["specificity"], "ppv": c["precision"],
            **{k: c[k] for k in ("tp", "fn", "tn", "fp")}}


# ----------------------------------------------------------------------------- figures


def study_metrics(studies: StudySet, rule: StudyRule) -> dict:
    """Every study-level figure of a split under `rule` and its thresholds, as JSON types."""
    truth, scores = studies.truth(), studies.scores(rule)
    normals = int(np.sum(truth[:, -1] < 0.5))
    verdicts = [rule.verdict(dict(zip(LABELS, row))) for row in scores]
    point = _point(truth[:, -1], [v[ANY] for v in verdicts])
    per_label = {}
    for i, label in enumerate(LABELS):   # as alerts name them: a subtype only on an `any` alert
        per_label[label] = {"auc": auc(truth[:, i], scores[:, i]), "threshold": rule.thresholds[label],
                            "studies_positive": int(truth[:, i].sum()),
                            **_point(truth[:, i], [v[label] for v in verdicts])}
    return {
        "rule": rule.describe(), "studies": len(studies), "positive_studies": len(studies) - normals,
        "normal_studies": normals, "auc": auc(truth[:, -1], scores[:, -1]), **point,
        "false_alerts_per_100_normal": (round(100.0 * point["fp"] / normals, 2) if normals else None),
        "alert_delay_slices": alert_delay(studies, rule),
        "per_label": per_label,
        "subtype_auc": {s: per_label[s]["auc"] for s in SUBTYPES},
    }


def _ranked(studies: StudySet, rule: StudyRule) -> tuple[np.ndarray, np.ndarray] | None:
    """The `any` study scores under `rule`: bleeding studies' highest first, normal studies'
    lowest first; None without both kinds of study."""
    truth, scores = studies.truth()[:, -1] > 0.5, studies.scores(rule)[:, -1]
    if truth.all() or not truth.any():
        return None
    return np.sort(scores[truth])[::-1], np.sort(scores[~truth])


def _at_share(ranked: np.ndarray, share: float) -> float:
    """The score that `share` of `ranked` reaches: its k-th entry, k = ceil(share × n), >= 1."""
    return float(ranked[max(1, math.ceil(share * len(ranked) - 1e-9)) - 1])


def best_specificity(studies: StudySet, rule: StudyRule, recall: float) -> float | None:
    """The highest `any` study specificity any threshold gives under `rule` while alerting at
    least `recall` of the bleeding studies: what the ranking leaves room for, whatever the
    operating point (None without both kinds of study). A diagnosis only: it is chosen on the
    studies it is measured on."""
    ranked = _ranked(studies, rule)
    if ranked is None:
        return None
    bleeds, normals = ranked
    return float(np.mean(normals < _at_share(bleeds, recall)))


def passing_band(studies: StudySet, rule: StudyRule, recall: float,
                 specificity: float) -> tuple[float, float] | None:
    """(lo, hi): every `any` threshold t with lo < t <= hi gives at least `recall` and
    `specificity` under `rule` on these studies; None where no threshold does (or without both
    kinds of study). A diagnosis, like `best_specificity`: a band that excludes the chosen
    threshold says the operating point failed where the ranking would have passed."""
    ranked = _ranked(studies, rule)
    if ranked is None:
        return None
    bleeds, normals = ranked
    hi, lo = _at_share(bleeds, recall), _at_share(normals, specificity)   # alerts: score >= t
    return (lo, hi) if lo < hi else None


def joint_band(sets, rule: StudyRule, recall: float,
               specificity: float) -> tuple[float, float] | None:
    """The `any` thresholds that meet both figures on every one of `sets` at once: the
    intersection of their `passing_band`s (None where one has none, or they do not overlap).
    How much room a model's ranking leaves across sites, whatever a calibration chose: seeds
    whose sites each pass somewhere can still have no threshold that serves them all."""
    lo, hi = 0.0, 1.0
    for studies in sets:
        band = passing_band(studies, rule, recall, specificity)
        if band is None:
            return None
        lo, hi = max(lo, band[0]), min(hi, band[1])
    return (lo, hi) if lo < hi else None


def errors_by(studies: StudySet, rule: StudyRule, attributes: dict[str, dict[str, float]],
              bins: int = 3) -> dict:
    """Which studies `rule` gets wrong, by each numeric attribute of a study (e.g. a phantom's
    site draws, `training.synthetic.read_acquisitions`): per axis, `bins` equal-width ranges
    (or each value, where an axis has no more than `bins`), with the normal studies that
    alerted and the bleeding ones that did not. Says which scanner or patient axis a model
    fails on at a new site (measured: site-e's false alerts rose with its skull-base streaks).
    Studies without attributes are counted, not guessed."""
    truth, scores = studies.truth(), studies.scores(rule)
    alerted = [rule.verdict(dict(zip(LABELS, row)))[ANY] for row in scores]
    known = [(s.uid, bool(t[-1] >= 0.5), bool(a)) for s, t, a in zip(studies, truth, alerted)
             if s.uid in attributes]
    axes = sorted({k for uid, *_ in known for k in attributes[uid]})
    result = {"studies_matched": len(known), "studies_unmatched": len(studies) - len(known), "axes": {}}
    for axis in axes:
        rows = [(attributes[uid][axis], bleed, alert) for uid, bleed, alert in known
                if axis in attributes[uid]]
        values, bleed, alert = (np.array(column) for column in zip(*rows))
        distinct = np.unique(values)
        if len(distinct) < 2:
            continue
        if len(distinct) <= bins:
            edges = [(float(v), float(v)) for v in distinct]
            which = np.searchsorted(distinct, values)
        else:
            cuts = np.linspace(distinct[0], distinct[-1], bins + 1)
            edges = [(float(cuts[i]), float(cuts[i + 1])) for i in range(bins)]
            which = np.minimum(np.searchsorted(cuts, values, side="right") - 1, bins - 1)
        result["axes"][axis] = [{
            "from": round(lo, 4), "to": round(hi, 4),
            "normal_studies": int(np.sum(here & ~bleed)), "false_alerts": int(np.sum(here & ~bleed & alert)),
            "bleeding_studies": int(np.sum(here & bleed)), "missed": int(np.sum(here & bleed & ~alert)),
        } for i, (lo, hi) in enumerate(edges) for here in [which == i]]
    return result


def alert_delay(studies: StudySet, rule: StudyRule) -> dict:
    """For positive studies that alert: slices sent after the first truly bleeding slice
    before the alert fires (0 = at that slice; negative = a non-bleeding slice triggered it),
    replaying arrival in instance order."""
    delays = []
    for s in studies:
        if s.truth[-1] < 0.5:
            continue
        order = s.arrival()
        fired = rule.first_positive_index(s.slices(order))
        if fired is None:
            continue
        first_bleed = int(np.flatnonzero(s.labels[order, -1] > 0.5)[0])
        delays.append(fired - first_bleed)
    if not delays:
        return {"studies": 0, "median": None, "p95": None, "max": None}
    d = np.asarray(delays, np.float64)
    return {"studies": len(delays), "median": float(np.median(d)),
            "p95": float(np.percentile(d, 95)), "max": int(d.max())}


def alerting_studies(studies: StudySet, rule: StudyRule) -> list[str]:
    """The UIDs of the studies the worker would raise a `first_positive` for."""
    return [s.uid for s, score in zip(studies, studies.scores(rule)[:, -1])
            if score >= rule.thresholds[ANY]]


def plot_study_curves(studies: StudySet, rule: StudyRule, path: Path) -> Path:
    """Study-level ROC and precision–recall of `any`, the operating point marked."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    truth, scores = studies.truth()[:, -1], studies.scores(rule)[:, -1]
    point = _point(truth, scores >= rule.thresholds[ANY])
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, title, xlabel, ylabel in ((roc, "study ROC (any)", "1 − specificity", "recall"),
                                      (pr, "study precision–recall (any)", "recall", "precision (PPV)")):
        ax.set_title(f"{title}, rule {rule}")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if 0 < truth.sum() < len(truth):
        fpr, tpr, _ = roc_curve(truth, scores)
        roc.plot(fpr, tpr, lw=1.5)
        precision, recall, _ = precision_recall_curve(truth, scores)
        pr.plot(recall, precision, lw=1.5)
        label = f"t={rule.thresholds[ANY]:.3g}: {point['tp']}/{point['tp'] + point['fn']} bleeds, " \
                f"{point['fp']}/{point['fp'] + point['tn']} normals alerted"
        roc.plot(1 - (point["specificity"] or 0), point["recall"] or 0, "ro", label=label)
        if point["ppv"] is not None:
            pr.plot(point["recall"] or 0, point["ppv"], "ro")
        roc.legend(loc="lower right", fontsize=8)
    else:
        roc.text(0.5, 0.5, "one class only", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
