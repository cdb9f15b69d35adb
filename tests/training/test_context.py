"""The slice-context head: its sequences, its identity start, and that it learns what one slice
cannot show (an isolated bright slice is not a bleed; a run of them is)."""
from __future__ import annotations

import numpy as np

from training import context
from training.data import Headers
from training.evaluate import weighted_log_loss


def _headers(studies, series, instances, positions=None):
    n = len(studies)
    return Headers(np.array(studies, dtype=str), np.array(series, dtype=str),
                   np.array(positions if positions is not None else [np.nan] * n, np.float64),
                   np.array(instances, np.float64))


def test_runs_follow_the_study_rules_neighbours():
    h = _headers(["a", "a", "a", "a", "b", "b", "a", "b"],
                 ["s1", "s1", "s1", "s1", "t", "t", "s2", "t"],
                 [3, 1, 2, 5, 2, 1, 1, 2])
    runs = [list(r) for r in context.runs(h)]
    # study a, series s1: instances 1,2,3 are a run, 5 starts another; s2 alone; study b: 1, 2
    # (row 7 is a second copy of instance 2 and is read once)
    assert sorted(runs) == sorted([[1, 2, 0], [3], [6], [5, 4]])


def test_the_head_starts_as_the_slice_model():
    head = context.build_head(dim=8)
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, (1, 7, 6)).astype(np.float32)
    out = np.asarray(head([rng.normal(size=(1, 7, 8)).astype(np.float32), context.logits_of(p)]))
    assert np.allclose(out, p, atol=1e-5)


def _toy(seed: int, studies: int) -> context.Sequences:
    """Slice logits that cannot tell a lone bright slice (an artefact) from a bleed: only the
    neighbours can. Features are noise."""
    rng = np.random.default_rng(seed)
    runs, ys, ps, fs, start = [], [], [], [], 0
    for _ in range(studies):
        n = 20
        y = np.zeros((n, 6), np.float32)
        logit = np.full(n, -3.0)
        if rng.random() < 0.5:                       # a bleed: 3-6 neighbouring slices
            length = int(rng.integers(3, 7))
            k0 = int(rng.integers(1, n - length - 1))
            y[k0:k0 + length, [0, 5]] = 1
            logit[k0:k0 + length] = rng.normal(1.0, 0.7, length)
        for k in rng.choice(n, 2, replace=False):   # lone bright slices, with or without a bleed
            if not y[max(0, k - 1):k + 2, 5].any():
                logit[k] = rng.normal(1.0, 0.7)
        p = np.full((n, 6), 1 / (1 + np.exp(3.0)), np.float32)
        p[:, 0] = p[:, 5] = 1 / (1 + np.exp(-logit))
        runs.append(np.arange(start, start + n))
        ys.append(y)
        ps.append(p)
        fs.append(rng.normal(size=(n, 4)).astype(np.float32))
        start += n
    return context.Sequences(runs, np.concatenate(ys), np.concatenate(ps), np.concatenate(fs))


def test_the_head_learns_what_one_slice_cannot_show():
    train, calib, test = _toy(1, 120), _toy(2, 40), _toy(3, 60)
    head, history = context.fit_head(train, calib, epochs=6, lr=3e-3, seed=0)
    before = weighted_log_loss(test.y, test.p)
    after = weighted_log_loss(test.y, context.apply(head, test))
    assert after < 0.7 * before, (before, after, history)
    lone = (test.p[:, 5] > 0.5) & (test.y[:, 5] == 0)
    assert lone.sum() >= 20
    assert context.apply(head, test)[lone, 5].mean() < 0.5 * test.p[lone, 5].mean()
