"""Expected anomaly posterior (EAP): a quality score for auxiliary (synthetic) anomalies.

Perini, Rudolph, Schmedding & Qiu, "Uncertainty-aware Evaluation of Auxiliary Anomalies with the Expected Anomaly
Posterior", TMLR 2024 (arXiv:2405.13699; reference code github.com/Lorenzo-Perini/ExpectedAnomalyPosterior,
``opendataval/dataval/uncertainty/EAP.py``, which we follow).

The label of an auxiliary anomaly ``x`` is Bernoulli with ``p_x ~ Beta(alpha_0, beta_0)``; the prior is the
training contamination, ``(alpha_0, beta_0) = (gamma, 1 - gamma)``. The data set contributes ``n p(x)``
pseudo-observations at ``x`` (``n`` normal training rows, ``p(x)`` the density there), of which a share
``P(Y = 1 | x)`` (the detector's calibrated anomaly probability) are anomalous, so the posterior mean is

    EAP(x) = (alpha_0 + n p(x) P(Y = 1 | x)) / (alpha_0 + beta_0 + n p(x)).

A realistic anomaly (where data could live, and that the detector calls anomalous) gets a high EAP; an
indistinguishable one (``P(Y = 1 | x)`` small, density high) a low one; an unrealistic one far from all data
(``p(x) = 0``) falls back to the prior ``gamma`` (aleatoric vs. epistemic uncertainty). ``EAP`` is averaged over
``n_subsets = 100`` random sub-samples of the training set (each row kept with probability ``q ~ U(q_min, 0.99)``)
to account for the detector's epistemic uncertainty.

* ``p(x)``: the inverse *rarity score* (Han et al., "Rarity Score: A New Metric to Evaluate the Uncommonness of
  Synthesized Images", ICLR 2023): ``rarity(x)`` = the smallest k-NN radius among the normal rows whose k-NN ball
  contains ``x`` (0 outside all balls); ``p(x) = (1/rarity(x)) / (1/rarity(x) + sum_i 1/rarity(x_i))`` over the
  normal rows ``x_i`` (0 outside all balls). ``k`` is the smallest radius order that places the training anomalies
  inside some ball, taken at the 95 % quantile of a Beta posterior, at least ``k = 5`` (reference
  ``find_minimum_k``).
* ``P(Y = 1 | x)``: a detector fitted on the sub-sample, its score squashed by ``1 - 2^{-(s / t)^2}`` with ``t`` the
  training ``1 - gamma`` score percentile (the anomatools ``SquashScaler`` of the reference notebook, whose
  ``np.percentile(s, int((1 - gamma) * 100))``, linear and truncated to a whole percent, we keep: it is
  :func:`oodscope.thresholds.threshold_for_contamination` with ``rule="linear_whole_percent"``). The reference
  notebook's detector is SSDO (semi-supervised label propagation) on an Isolation Forest; we use an unsupervised
  detector itself, by default ``knn_distance``: the squashing assumes scores that start at 0 for the most normal
  rows, which distances do (Isolation Forest scores do not; negative scores are shifted by the training minimum,
  which keeps the order but not that calibration). The quantile ``t`` uses leave-self-out k-NN distances of the
  training rows, as PyOD's ``decision_scores_`` do.
"""

from __future__ import annotations

import numpy as np

from ..detectors.anomaly._base import check_contamination
from ..thresholds import threshold_for_contamination


def posterior_mean(p_anomaly: np.ndarray, density: np.ndarray, n: int, prior: tuple[float, float]) -> np.ndarray:
    """``(alpha_0 + n p(x) P(Y=1|x)) / (alpha_0 + beta_0 + n p(x))`` with ``prior = (beta_0, alpha_0)`` as
    (normal, anomaly) pseudo-counts, the order of the reference code's ``beta_c``."""
    normal, anomaly = (float(v) for v in prior)
    weight = n * np.asarray(density, dtype=np.float64)
    return (anomaly + weight * np.asarray(p_anomaly, dtype=np.float64)) / (normal + anomaly + weight)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def rarity_scores(real: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rarity score of each query w.r.t. ``real`` rows: min k-NN radius of the real balls containing it, else 0."""
    real, queries = np.asarray(real, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    if not 1 <= k < len(real):
        raise ValueError(f"EAP: rarity needs 1 <= k < {len(real)} (number of normal rows), got k={k}")
    radius = np.sort(_distances(real, real), axis=1)[:, k]  # index 0 is the row itself
    inside = radius[:, None] > _distances(real, queries)
    smallest = np.where(inside, radius[:, None], np.inf).min(axis=0)
    return np.where(inside.any(axis=0), smallest, 0.0)


def minimum_k(real: np.ndarray, anomalies: np.ndarray, min_k: int = 5) -> int:
    """The reference ``find_minimum_k``: per training anomaly the first radius order ``k >= min_k`` whose balls
    contain it, summarised by the 95 % quantile of ``Beta(1 + sum p*, 1 + m - sum p*)`` on the normalised orders."""
    from scipy.stats import beta

    n1 = len(real)
    if n1 <= min_k + 1:
        return n1 - 1
    if len(anomalies):
        sorted_rows = np.sort(_distances(real, real), axis=1)
        to_anomalies = _distances(real, anomalies)
        # anomaly a is inside r's ball of order k iff fewer than k + 1 real rows lie within d(r, a) of r
        counts = np.stack([np.searchsorted(sorted_rows[i], to_anomalies[i], side="right") for i in range(n1)])
        first = np.clip(counts.min(axis=0), min_k, n1 - 1)
    else:
        first = np.empty(0)
    pstar = (first - min_k) / (n1 - 1 - min_k)
    kstar = int(beta.ppf(0.95, 1 + pstar.sum(), 1 + len(pstar) - pstar.sum()) * (n1 - 1 - min_k) + min_k)
    return max(min(n1 - 1, kstar), min_k)


def squash(scores: np.ndarray, train_scores: np.ndarray, contamination: float) -> np.ndarray:
    """``1 - 2^{-(s / t)^2}``, ``t`` = training ``1 - contamination`` percentile (scores shifted to start at 0).

    ``t`` follows the reference code (anomatools' ``SquashScaler``): ``np.percentile(s, int((1 - gamma) * 100))``,
    linear interpolation at the percent truncated to a whole number, i.e.
    :func:`oodscope.thresholds.threshold_for_contamination` with ``rule="linear_whole_percent"``. ``t`` is where the
    squashed probability crosses 1/2 (a scale, not a flag threshold); the truncation matters for gamma off whole
    percents (2.72 % on WDBC gives the 97th percentile, not the 97.28th).
    """
    train_scores = np.asarray(train_scores, dtype=np.float64)
    low = min(0.0, float(np.min(train_scores)))
    t = threshold_for_contamination(train_scores - low, contamination, rule="linear_whole_percent")
    if not t > 0:
        raise ValueError("EAP: the detector's training score quantile is 0; cannot squash scores into probabilities")
    return 1.0 - np.exp(np.log(0.5) * ((np.asarray(scores, dtype=np.float64) - low) / t) ** 2)


def _training_scores(model, X: np.ndarray) -> np.ndarray:
    """Scores of the training rows for the squashing quantile; a k-NN distance leaves the row itself out (k + 1
    neighbours, as PyOD's ``decision_scores_``), otherwise every training row would sit at distance 0 of itself."""
    if model.name == "knn_distance":
        return model.clone(k=model.k + 1).fit(X).score(X)
    return model.score(X)


def expected_anomaly_posterior(X: np.ndarray, y: np.ndarray, auxiliary: np.ndarray, detector: str = "knn_distance",
                               k: int = 5, n_subsets: int = 100, contamination: float | None = None,
                               seed: int = 331) -> np.ndarray:
    """EAP quality score of each auxiliary anomaly (higher = better auxiliary anomaly).

    ``X``, ``y``: the training data with labels (1 = anomaly, typically few); ``auxiliary``: candidate anomalies.
    ``contamination`` defaults to the share of anomalies in ``y`` (the prior); it must lie in (0, 0.5].
    """
    from ..detectors import create, get

    X, auxiliary = np.asarray(X, dtype=np.float64), np.asarray(auxiliary, dtype=np.float64)
    y = np.asarray(y).astype(int)
    if X.ndim != 2 or auxiliary.ndim != 2 or auxiliary.shape[1] != X.shape[1] or y.shape != (len(X),):
        raise ValueError(f"EAP: X {X.shape}, y {y.shape} and auxiliary {auxiliary.shape} do not match")
    if not (np.isfinite(X).all() and np.isfinite(auxiliary).all()):
        raise ValueError("EAP: X or auxiliary contain NaN or inf")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("EAP: y must hold 0 (normal) and 1 (anomaly)")
    gamma = check_contamination("EAP", y.mean() if contamination is None else contamination)
    prior = (1.0 - gamma, gamma)
    anomalies = X[y == 1]
    n = len(X)
    rng = np.random.default_rng(seed)
    min_share = (k + 1 + len(anomalies)) / n
    if min_share >= 0.99:
        raise ValueError(f"EAP: {n} training rows are too few for k={k} and {len(anomalies)} anomalies")
    takes_seed = get(detector).is_stochastic()
    total = np.zeros(len(auxiliary))
    for share in rng.uniform(min_share, 0.99, size=int(n_subsets)):
        keep = rng.random(n) < share
        X_sub, y_sub = X[keep], y[keep]
        normals = X_sub[y_sub == 0]
        model = create(detector, **({"seed": int(rng.integers(2 ** 31))} if takes_seed else {})).fit(X_sub)
        p_anomaly = squash(model.score(auxiliary), _training_scores(model, X_sub), gamma)
        order = minimum_k(normals, anomalies, min_k=k)
        rarity = rarity_scores(normals, np.vstack([normals, auxiliary]), order)
        with np.errstate(divide="ignore"):
            inverse = np.where(rarity > 0, 1.0 / rarity, 0.0)
        real_mass = inverse[:len(normals)].sum()
        density = inverse[len(normals):] / (inverse[len(normals):] + real_mass)
        total += posterior_mean(p_anomaly, density, len(normals), prior)
    return total / int(n_subsets)
