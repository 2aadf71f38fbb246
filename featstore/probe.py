"""``featstore probe``: a logistic-regression linear probe trained on stored embeddings, no re-encoding.

The model is the seed notebook's, ``LogisticRegression(random_state=0, C=C, max_iter=...)``: multinomial
cross-entropy plus ``||W||^2 / 2C``, intercept unpenalised. The default solver minimises that same objective
with torch's L-BFGS in float32 (on the GPU when there is one); ``--solver sklearn`` runs the seed's call itself.
Without ``--C``, C comes from a sweep on a validation split carved from train (the CLIP paper's protocol),
and the chosen C is refit on all of train.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featstore.errors import FeatstoreError
from featstore.store import Store, atomic_write

SOLVERS = ("torch", "sklearn")
TOLERANCE = 1e-4  # sklearn's default: stop when no gradient entry (here: preconditioned) exceeds it
VALIDATION_FRACTION = 0.2
COARSE_GRID = [10.0 ** e for e in range(-6, 7, 2)]
MIN_C = 1e-30  # below it the torch solver's float32 penalty 1 / (C n) can overflow; such a probe is all intercept
ROWS_PER_CHUNK = 1024  # a chunk of features and its logits stay in cache between the two matmuls;
#                       larger chunks were slower and left tens of MB of allocator pages behind
PRECONDITIONER_WEIGHT = 0.1  # measured on CLIP-like features: 0.1 took the fewest iterations of 0.01..1


@dataclass
class LinearProbe:
    """A fitted probe, with sklearn's attribute names: ``classes_[argmax(x @ coef_.T + intercept_)]``."""

    coef_: np.ndarray
    intercept_: np.ndarray
    classes_: np.ndarray
    n_iter_: int

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(features @ self.coef_.T + self.intercept_, axis=1)]


# ---- solvers: fit(features, targets 0..k-1, classes, C, max_iter, warm) -> LinearProbe --------------
def fit_sklearn(features, targets, classes, C, max_iter, warm=None) -> LinearProbe:
    """The seed's call, ``LogisticRegression(random_state=0, C=C, max_iter=max_iter)``.

    sklearn fits only the classes present in TARGETS (a class whose one row was held out for validation is
    absent); the probe keeps a row per class of CLASSES, and an absent class gets no score (never predicted)."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(targets)
    classifier = LogisticRegression(random_state=0, C=C, max_iter=max_iter, warm_start=warm is not None)
    if warm is not None:
        coef, intercept = warm.coef_[present], warm.intercept_[present]
        intercept = np.where(np.isfinite(intercept), intercept, 0.0)  # a class the warm fit did not see
        if len(present) == 2:
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        classifier.coef_, classifier.intercept_ = coef.copy(), intercept.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is the user's choice, as in the seed
        classifier.fit(features, targets)
    coef, intercept = classifier.coef_, classifier.intercept_
    if len(present) == 2:  # sklearn keeps one row for two classes; the probe file always has one per class
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    full_coef = np.zeros((len(classes), coef.shape[1]), dtype=coef.dtype)
    full_intercept = np.full(len(classes), -np.inf, dtype=intercept.dtype)
    full_coef[present], full_intercept[present] = coef, intercept
    return LinearProbe(full_coef, full_intercept, classes, int(classifier.n_iter_[0]))


def fit_torch(features, targets, classes, C, max_iter, warm=None, device: str = "cpu",
              tol: float = TOLERANCE) -> LinearProbe:
    """The same objective as sklearn (mean cross-entropy + ||W||^2 / 2Cn), minimised by torch's L-BFGS.

    Two exact reparametrisations speed it up without moving the minimum: the intercept absorbs the feature
    mean (``b = c - W @ mean``), and ``W = V @ L^-1`` with ``L L^T = 0.1 cov + I/Cn`` evens out the
    feature directions' scales, so L-BFGS needs fewer iterations. Loss and gradient are computed in row
    chunks, so memory beyond the features is a few chunk-sized buffers.
    """
    import torch

    x = torch.as_tensor(features).to(device)
    y = torch.as_tensor(targets, dtype=torch.int64).to(device)
    n, d = x.shape
    k = len(classes)
    # sklearn fits two classes as one binomial model; softmax over two rows with the penalty halved is the same
    l2 = (2.0 if k == 2 else 1.0) / (C * n)
    mean = x.mean(0)
    covariance = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, n, ROWS_PER_CHUNK):
        centred = (x[start:start + ROWS_PER_CHUNK] - mean).double()
        covariance.addmm_(centred.T, centred, alpha=1.0 / n)
    # any positive-definite L leaves the minimum where it is; the floor keeps Cholesky stable for huge C
    ridge = max(l2, 1e-6 * PRECONDITIONER_WEIGHT * float(covariance.diagonal().mean()))
    identity = torch.eye(d, dtype=torch.float64, device=device)
    cholesky = torch.linalg.cholesky(PRECONDITIONER_WEIGHT * covariance + ridge * identity)
    inverse = torch.linalg.solve_triangular(cholesky, identity, upper=False).to(x.dtype)

    v = torch.zeros(k, d, dtype=x.dtype, device=device)
    c = torch.zeros(k, dtype=x.dtype, device=device)
    if warm is not None:
        w0 = torch.as_tensor(warm.coef_, dtype=x.dtype, device=device)
        v = w0 @ cholesky.to(x.dtype)
        c = torch.as_tensor(warm.intercept_, dtype=x.dtype, device=device) + w0 @ mean
    v.grad, c.grad = torch.zeros_like(v), torch.zeros_like(c)
    minus_one = torch.full((ROWS_PER_CHUNK, 1), -1.0, dtype=x.dtype, device=device)

    def weights():
        w = v @ inverse
        return w, c - w @ mean

    def closure():
        w, b = weights()
        loss = 0.5 * l2 * (w * w).sum()
        grad_w, grad_b = l2 * w, torch.zeros_like(c)
        for start in range(0, n, ROWS_PER_CHUNK):
            rows, labels = x[start:start + ROWS_PER_CHUNK], y[start:start + ROWS_PER_CHUNK, None]
            log_p = torch.log_softmax(torch.addmm(b, rows, w.T), 1)
            loss -= log_p.gather(1, labels).sum() / n
            residual = log_p.exp_().scatter_add_(1, labels, minus_one[:len(labels)])  # p - onehot
            grad_w.addmm_(residual.T, rows, alpha=1.0 / n)
            grad_b += residual.sum(0) / n
        grad_w -= torch.outer(grad_b, mean)
        v.grad.copy_(grad_w @ inverse.T)
        c.grad.copy_(grad_b)
        return loss

    optimizer = torch.optim.LBFGS([v, c], lr=1, max_iter=max_iter, max_eval=max_iter * 5 // 4,
                                  tolerance_grad=tol, tolerance_change=1e-12, history_size=10,
                                  line_search_fn="strong_wolfe")
    with torch.no_grad():
        optimizer.step(closure)
        w, b = weights()
    n_iter = optimizer.state[optimizer.param_groups[0]["params"][0]]["n_iter"]
    return LinearProbe(w.cpu().numpy(), b.cpu().numpy(), classes, int(n_iter))


def fit(features, targets, classes, C, max_iter, solver="torch", warm=None, device="cpu") -> LinearProbe:
    if solver == "sklearn":
        return fit_sklearn(features, targets, classes, C, max_iter, warm)
    return fit_torch(features, targets, classes, C, max_iter, warm, device)


def accuracy(classifier: LinearProbe, features: np.ndarray, labels: np.ndarray) -> float:
    return float((classifier.predict(features) == labels).mean())


# ---- C sweep ------------------------------------------------------------------------------------
def validation_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, validation): a stratified 20 % held out of train, seed 0."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    fit_rows, val_rows = train_test_split(np.arange(len(labels)), test_size=VALIDATION_FRACTION, random_state=0,
                                          stratify=stratify)
    return np.sort(fit_rows), np.sort(val_rows)


def sweep_C(x_fit, t_fit, x_val, t_val, classes, max_iter, solver="torch", device="cpu"):
    """Best C on the validation rows: a 100x-step log grid from 1e-6 up, then two halvings of the step.

    Fits run from small C to large with warm starts, and the grid stops at the first C that scores below
    the best so far: large C costs the most iterations and, past the peak, only overfits more.
    Returns (best C, {C: validation accuracy}, the fitted probe at the best C).
    """
    scores: dict[float, float] = {}
    fitted: dict[float, LinearProbe] = {}

    def score(C: float) -> float:
        if C not in scores:
            nearest = min(fitted, key=lambda c: abs(np.log10(c / C)), default=None)
            fitted[C] = fit(x_fit, t_fit, classes, C, max_iter, solver, fitted.get(nearest), device)
            scores[C] = accuracy(fitted[C], x_val, classes[t_val])
        return scores[C]

    def best() -> float:
        return max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))

    for C in COARSE_GRID:
        if score(C) < scores[best()]:
            break
    step = 1.0
    for _ in range(2):
        centre = best()
        for C in (centre * 10 ** -step, centre * 10 ** step):
            score(C)
        step /= 2
    return best(), scores, fitted[best()]


# ---- reading the store --------------------------------------------------------------------------
def labelled_rows(store: Store, split: str) -> pa.Table:
    """id, label, shard, row of the labelled rows of SPLIT, in id order (no embeddings yet)."""
    store.split_info(split)
    table = store.read_split(split, ["id", "label"], locate=True)
    table = table.filter(pc.is_valid(table.column("label")))
    if table.num_rows == 0:
        raise FeatstoreError(f"split {split!r} has no labelled rows: the probe needs labels")
    return table


def load_features(store: Store, split: str, rows: pa.Table) -> np.ndarray:
    """The float32 embeddings of ROWS (from ``labelled_rows``), in that order, read shard by shard."""
    features = np.empty((rows.num_rows, store.dim), dtype=np.float32)
    store.fill_embeddings(split, rows.column("shard").to_numpy(), rows.column("row").to_numpy(), features)
    return features


# ---- the saved classifier -----------------------------------------------------------------------
def save_classifier(path: str, classifier: LinearProbe, store: Store, C: float) -> None:
    """npz of coef/intercept plus a JSON sidecar (classes, C, model identity): no pickle."""
    base = path[:-4] if path.endswith(".npz") else path
    os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, coef=classifier.coef_, intercept=classifier.intercept_, classes=classifier.classes_)

    atomic_write(os.path.abspath(base + ".npz"), write_npz)
    meta = {
        "classes": [store.classes[c] for c in classifier.classes_],
        "class_ids": [int(c) for c in classifier.classes_],
        "C": C,
        "model": store.manifest.model,
        "normalised_inputs": False,
    }
    data = json.dumps(meta, indent=1)

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(data)

    atomic_write(os.path.abspath(base + ".json"), write_json)


def load_classifier(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The saved probe: arrays (coef, intercept, classes) and metadata; predict with argmax(x @ coef.T + b)."""
    base = path[:-4] if path.endswith((".npz", ".json")) else path
    with np.load(base + ".npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(base + ".json") as f:
        return arrays, json.load(f)


# ---- the command --------------------------------------------------------------------------------
def open_probe(store_dir: str, train_split: str, test_split: str, C: float | None, max_iter: int, solver: str,
               device: str) -> tuple[Store, pa.Table, pa.Table, str]:
    """The options checked, then (store, labelled train rows, labelled test rows, the solver's device)."""
    if C is not None and not MIN_C <= C < math.inf:
        raise FeatstoreError(f"--C must be positive, finite and at least {MIN_C:g} (got {C:g})")
    if max_iter < 1:
        raise FeatstoreError("--max-iter must be at least 1")
    if solver not in SOLVERS:
        raise FeatstoreError(f"unknown --solver {solver!r}: use {' or '.join(SOLVERS)}")
    store = Store.open(store_dir)
    train = labelled_rows(store, train_split)
    test = labelled_rows(store, test_split)
    if len(pc.unique(train.column("label"))) < 2:
        raise FeatstoreError(f"split {train_split!r} has fewer than two classes: nothing to separate")
    if solver == "torch":
        from featstore.models import resolve_device

        device = str(resolve_device(device))
    return store, train, test, device


def probe(store_dir: str, train_split: str, test_split: str, C: float | None = None, max_iter: int = 1000,
          out: str | None = None, solver: str = "torch", device: str = "auto") -> dict[str, Any]:
    """Fit on TRAIN_SPLIT (sweeping C when it is None), report accuracy on TEST_SPLIT.

    Memory: the train features once, as float32, loaded shard by shard; then the test features once.
    With a sweep, train rows are loaded validation-last so both parts are views, not copies.
    """
    store, train, test, device = open_probe(store_dir, train_split, test_split, C, max_iter, solver, device)
    if out:  # refused before any work: PATH.npz and PATH.json
        out = store.check_output(out)
        base = out[:-4] if out.endswith(".npz") else out
        for path in (base + ".npz", base + ".json"):
            store.check_output(path)
    classes, targets = np.unique(train.column("label").to_numpy(), return_inverse=True)

    sweep = warm = None
    if C is None:
        held_out = math.ceil(VALIDATION_FRACTION * len(targets))
        if min(held_out, len(targets) - held_out) < len(classes):
            raise FeatstoreError(f"split {train_split!r} has too few labelled rows ({len(targets)}) to choose C on a "
                                 f"held-out {VALIDATION_FRACTION:.0%} with {len(classes)} classes: give --C")
        fit_rows, val_rows = validation_split(targets)
        order = np.concatenate([fit_rows, val_rows])
        train, targets = train.take(pa.array(order)), targets[order]
        x_train = load_features(store, train_split, train)
        n_fit = len(fit_rows)
        C, sweep, warm = sweep_C(x_train[:n_fit], targets[:n_fit], x_train[n_fit:], targets[n_fit:],
                                 classes, max_iter, solver, device)
    else:
        x_train = load_features(store, train_split, train)
    classifier = fit(x_train, targets, classes, C, max_iter, solver, warm, device)
    del x_train
    test_labels = test.column("label").to_numpy()
    acc1 = accuracy(classifier, load_features(store, test_split, test), test_labels)
    if out:
        save_classifier(out, classifier, store, C)
    result = {"acc1": acc1, "C": C, "n_train": len(targets), "n_test": len(test_labels),
              "solver": solver, "iterations": classifier.n_iter_}
    if sweep:
        result["sweep"] = {f"{c:g}": s for c, s in sorted(sweep.items())}
    return result
