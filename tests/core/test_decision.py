"""The shared study rule (ich.decision) on hand-made probabilities whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from ich.decision import RuleError, SliceScore, StudyRule
from ich.labels import ANY, DEFAULT_THRESHOLDS, LABELS
from ich.model import ArtifactError, ModelCard


def study(any_probs, series="s1", positions=None):
    """Slices whose every label is `any`'s probability, at positions 0, 5, 10 … mm (no instance
    numbers: neighbours by z)."""
    positions = positions if positions is not None else [5.0 * i for i in range(len(any_probs))]
    return [SliceScore([p] * len(LABELS), series, z, key=i) for i, (p, z) in enumerate(zip(any_probs, positions))]


def rule(name, k, t=0.5):
    return StudyRule(name, k, {**DEFAULT_THRESHOLDS, ANY: t})


def test_max_alerts_on_one_slice_consecutive_needs_neighbours():
    one_spike = study([0.1, 0.1, 0.9, 0.1, 0.1])
    assert rule("max", 1).decide(one_spike).any
    decision = rule("consecutive", 2).decide(one_spike)
    assert not decision.any and decision.scores[ANY] == pytest.approx(0.1)
    run = study([0.1, 0.7, 0.9, 0.1])
    decision = rule("consecutive", 2).decide(run)
    assert decision.any and decision.scores[ANY] == pytest.approx(0.7) and decision.evidence == [1, 2]
    assert not rule("consecutive", 3).decide(run).any


def test_neighbours_are_neighbours_in_space_within_one_series():
    # Arrival order 0, 2, 1: slices 0 and 2 arrive together but are not adjacent in space.
    shuffled = [SliceScore([0.9] * 6, "a", 0.0), SliceScore([0.9] * 6, "a", 10.0),
                SliceScore([0.1] * 6, "a", 5.0)]
    assert not rule("consecutive", 2).decide(shuffled).any
    # Two series, one high slice each: not neighbours.
    split = [SliceScore([0.9] * 6, "a", 0.0), SliceScore([0.9] * 6, "b", 5.0)]
    assert not rule("consecutive", 2).decide(split).any
    # Without positions, instance order falls back to the order given.
    assert rule("consecutive", 2).decide([SliceScore([0.9] * 6, "a"), SliceScore([0.8] * 6, "a")]).any


def test_instance_numbers_define_neighbours_so_a_gap_is_not_a_neighbour():
    # Instances 1 and 3 arrive first, both bright: not neighbours while 2 is missing...
    arrived = [SliceScore([0.9] * 6, "a", 0.0, 1), SliceScore([0.9] * 6, "a", 10.0, 3)]
    r = rule("consecutive", 2)
    assert not r.decide(arrived).any
    # ...and once 2 arrives dim, still not: the verdict never flips back.
    assert not r.decide(arrived + [SliceScore([0.1] * 6, "a", 5.0, 2)]).any
    assert r.decide(arrived + [SliceScore([0.8] * 6, "a", 5.0, 2)]).any
    # A slice sent twice (same instance number) is one slice, at its higher probability.
    twice = [SliceScore([0.95] * 6, "a", 0.0, 7), SliceScore([0.2] * 6, "a", 0.0, 7)]
    assert not r.decide(twice).any and r.decide(twice + [SliceScore([0.9] * 6, "a", 5.0, 8)]).any
    assert rule("topk", 2).scores([[0.9] * 6, [0.9] * 6], ["a", "a"], [0.0, 0.0], [7, 7])[-1] == pytest.approx(0.45)


@pytest.mark.parametrize("name,k", [("consecutive", 2), ("consecutive", 3), ("topk", 3), ("max", 1)])
def test_with_instance_numbers_the_score_only_grows_in_any_arrival_order(name, k):
    rng = np.random.default_rng(11)
    r = rule(name, k, 0.6)
    for _ in range(100):
        n = int(rng.integers(2, 15))
        probs = rng.random(n) ** 2
        arrival = rng.permutation(n)
        slices = [SliceScore([probs[i]] * 6, "a", 100.0 - 5 * i, i + 1) for i in arrival]
        scores = [r.scores([s.probabilities for s in slices[: j + 1]], ["a"] * (j + 1),
                           [s.position for s in slices[: j + 1]], [s.instance for s in slices[: j + 1]])[-1]
                  for j in range(n)]
        assert all(b >= a - 1e-12 for a, b in zip(scores, scores[1:]))
        final = r.decide(slices)
        assert (r.first_positive_index(slices) is not None) == final.any


def test_topk_mean_counts_missing_slices_as_zero_and_only_grows():
    r = rule("topk", 3, 0.6)
    assert r.scores([[0.9] * 6]) == pytest.approx([0.3] * 6)
    p = [0.9, 0.2, 0.8, 0.95, 0.1]
    scores = [rule("topk", 3).scores(np.repeat(np.array(p[: i + 1])[:, None], 6, axis=1))[-1]
              for i in range(len(p))]
    assert scores == sorted(scores) and scores[-1] == pytest.approx((0.95 + 0.9 + 0.8) / 3)


@pytest.mark.parametrize("name,k", [("max", 1), ("consecutive", 2), ("consecutive", 3), ("topk", 2)])
def test_first_positive_index_is_the_first_prefix_that_decides_positive(name, k):
    rng = np.random.default_rng(7)
    r = rule(name, k, 0.6)
    for _ in range(200):
        n = int(rng.integers(1, 14))
        probs = rng.random(n) ** 2
        slices = study(list(probs), positions=list(rng.permutation(n) * 5.0))
        expected = next((i for i in range(n) if r.decide(slices[: i + 1]).any), None)
        assert r.first_positive_index(slices) == expected


def test_subtypes_follow_the_same_rule_with_their_own_thresholds():
    p = np.zeros((4, 6))
    p[1:3, LABELS.index("subdural")] = 0.8
    p[2, LABELS.index("epidural")] = 0.99
    p[1:3, -1] = 0.85
    slices = [SliceScore(row, "s", float(i)) for i, row in enumerate(p)]
    r = StudyRule("consecutive", 2, {**DEFAULT_THRESHOLDS, "subdural": 0.7, "epidural": 0.5, ANY: 0.8})
    positive = r.decide(slices).positive
    assert positive["subdural"] and positive[ANY] and not positive["epidural"]
    # A subtype is named only on a study positive for `any`.
    quiet = r.with_thresholds({ANY: 0.9}).decide(slices)
    assert quiet.scores["subdural"] >= 0.7 and not any(quiet.positive.values())


def test_rules_are_validated_and_old_cards_read_as_max():
    with pytest.raises(RuleError):
        StudyRule("median", 1)
    with pytest.raises(RuleError):
        StudyRule("consecutive", 0)
    with pytest.raises(RuleError):
        StudyRule("max", 2)
    legacy = StudyRule.from_card(None, {ANY: 0.2})
    assert (legacy.name, legacy.k, legacy.thresholds[ANY]) == ("max", 1, 0.2)
    card = ModelCard(version="v", study_rule={"name": "consecutive", "k": 2})
    card.validate()
    assert str(card.rule({ANY: 0.3})) == "consecutive-2" and card.rule({ANY: 0.3}).thresholds[ANY] == 0.3
    with pytest.raises(ArtifactError):
        ModelCard(version="v", study_rule={"name": "consecutive", "k": 99}).validate()
