"""The torch L-BFGS probe solver minimises sklearn's objective: same coefficients, same predictions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from featstore.probe import COARSE_GRID, fit_sklearn, fit_torch, sweep_C, validation_split


def separable_enough(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes with an offset and uneven feature scales, like raw CLIP features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d))
    targets = rng.integers(0, k, size=n)
    scales = np.geomspace(3.0, 0.05, d)
    return ((means[targets] * 0.6 + rng.normal(size=(n, d))) * scales + 2.0).astype(np.float32), targets


def objective(coef, intercept, x, targets, C) -> float:
    """sklearn's objective in float64: C * sum of cross-entropies + ||W||^2 / 2 (binomial form for two classes)."""
    x, coef, intercept = x.astype(np.float64), coef.astype(np.float64), intercept.astype(np.float64)
    if len(coef) == 2:  # two softmax rows are one binomial model w = w1 - w0
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        margin = (x @ coef.T + intercept)[:, 0] * np.where(targets == 1, 1, -1)
        return C * np.logaddexp(0, -margin).sum() + 0.5 * (coef ** 2).sum()
    logits = x @ coef.T + intercept
    log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return -C * log_p[np.arange(len(x)), targets].sum() + 0.5 * (coef ** 2).sum()


@pytest.mark.parametrize("k", [2, 5])
def test_torch_solver_minimises_sklearns_objective(k):
    x, targets = separable_enough(400, 24, k, seed=k)
    classes = np.arange(k) * 3 + 1  # class ids need not be 0..k-1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = LogisticRegression(random_state=0, C=0.5, max_iter=100_000, tol=1e-10).fit(
            x.astype(np.float64), classes[targets])
    best = objective(exact.coef_ if k > 2 else np.vstack([0 * exact.coef_, exact.coef_]),
                     exact.intercept_ if k > 2 else np.array([0.0, exact.intercept_[0]]), x, targets, 0.5)

    seed = fit_sklearn(x, targets, classes, 0.5, 1000)  # the seed's call, default tolerance
    mine = fit_torch(x, targets, classes, 0.5, 1000)  # as the CLI runs it
    tight = fit_torch(x, targets, classes, 0.5, 10_000, tol=1e-7)
    warm = fit_torch(x, targets, classes, 0.5, 1000, warm=fit_torch(x, targets, classes, 50.0, 1000))
    seed_gap = objective(seed.coef_, seed.intercept_, x, targets, 0.5) - best
    for probe in (mine, tight, warm):
        gap = objective(probe.coef_, probe.intercept_, x, targets, 0.5) - best
        assert -1e-6 * best <= gap <= max(seed_gap, 0) + 1e-5 * best  # as close to the minimum as sklearn gets
        assert np.mean(probe.predict(x) == exact.predict(x)) >= 0.99  # only near-ties may differ
    assert np.mean(seed.predict(x) == exact.predict(x)) >= 0.99
    assert not np.allclose(mine.coef_, 0)


def test_sweep_stops_past_the_peak_and_refines_around_it():
    x, targets = separable_enough(600, 24, 4, seed=7)
    fit_rows, val_rows = validation_split(targets)
    assert len(val_rows) == 120 and not set(fit_rows) & set(val_rows)
    assert np.bincount(targets[val_rows]).min() >= 0.15 * 120  # stratified
    classes = np.arange(4)
    best, scores, probe = sweep_C(x[fit_rows], targets[fit_rows], x[val_rows], targets[val_rows], classes, 1000)
    assert probe.coef_.shape == (4, 24) and scores[best] == max(scores.values())
    coarse = [c for c in COARSE_GRID if c in scores]
    assert coarse == COARSE_GRID[:len(coarse)]  # from the smallest C up
    values = [scores[c] for c in coarse]
    assert all(values[i] >= max(values[:i]) for i in range(1, len(values) - 1))  # no drop before the last
    if len(coarse) < len(COARSE_GRID):
        assert values[-1] < max(values[:-1])  # it stopped at the first drop
    refined = set(scores) - set(coarse)
    coarse_best = max(coarse, key=lambda c: (scores[c], -abs(np.log10(c))))  # sweep_C breaks ties towards 1
    assert len(refined) >= 2 and all(abs(np.log10(c / coarse_best)) <= 1 + 1e-9 for c in refined)


@pytest.mark.parametrize("fit", [fit_sklearn, fit_torch])
def test_a_class_missing_from_the_fit_rows_keeps_its_row_and_is_never_predicted(fit):
    """A class whose only row went to validation is absent from the fit: the probe still has one row per class
    (so class ids stay aligned), predicts only classes it saw, and agrees with sklearn's own fit on them."""
    x, targets = separable_enough(300, 8, 4, seed=3)
    seen = targets != 2
    classes = np.array([10, 11, 12, 13])
    probe = fit(x[seen], targets[seen], classes, 1.0, 1000)
    assert probe.coef_.shape == (4, 8) and probe.intercept_.shape == (4,)
    predicted = probe.predict(x)
    assert 12 not in predicted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(random_state=0, C=1.0, max_iter=1000).fit(x[seen], targets[seen])
    agreement = (predicted == classes[reference.predict(x)]).mean()
    assert agreement >= 0.98, agreement
    warm = fit(x, targets, classes, 1.0, 1000, warm=probe)  # a warm start from it fits every class
    assert np.isfinite(warm.intercept_).all() and set(warm.predict(x)) == set(classes)
