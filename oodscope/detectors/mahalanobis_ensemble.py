"""The full Mahalanobis method: several layers, input pre-processing, logistic-regression ensemble.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018, Algorithm 1:

1. For every layer ``l`` (spatially averaged activations, Sec. 2.2 "Feature ensemble"), fit class means
   ``mu_{l,c}`` and one tied covariance ``Sigma_l`` on the training set (Eq. 1).
2. Input pre-processing (Eq. 4): ``x_hat = x + eps * sign(grad_x M_l(x))`` with the confidence
   ``M_l(x) = max_c -(f_l(x) - mu_{l,c})^T Sigma_l^-1 (f_l(x) - mu_{l,c})``, i.e. one signed-gradient step that
   brings the sample closer to its closest class; the layer's score is computed on ``x_hat``. As in the
   authors' code, ``eps`` is in units of the raw input: when the preprocessing has a per-channel ``std``
   (e.g. :class:`~oodscope.data.transforms.ImageNormalize`), the step in model-input space is ``eps / std``.
   ``eps`` is chosen from the paper's grid :data:`EPSILON_GRID` on validation data.
3. The per-layer scores are combined by a logistic regression ``sum_l alpha_l M_l(x)`` fitted on validation
   data: ``fit(train, val=id_val, ood_val=ood_val)`` (the detector declares ``Need.VALIDATION`` and
   ``Need.OOD_VALIDATION``; the paper's "validation on OOD samples" setting; the paper's adversarial-free
   variant uses FGSM samples of ID data as the OOD side, which can be passed the same way) also picks
   ``epsilon_`` from the candidates ``epsilons``. Without ``ood_val`` the layer scores are summed with equal
   weights (pytorch-ood's ``MultiMahalanobis`` default) and ``epsilon_ = epsilon``.

The OOD score is the regression's decision value on the per-layer squared distances (higher = more OOD).
Layers are named modules extracted with ``extract(..., layers=[...])`` (spatial mean, the default
``layer_reduce``); ``"penultimate"`` names the penultimate features. With ``epsilon > 0`` scoring re-runs the
model (``Outputs.source``): cached outputs alone are not enough.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..extraction.outputs import Need, Outputs
from ._common import n_classes_of
from ._gaussian import TiedGaussian
from .base import Detector

PENULTIMATE = "penultimate"
EPSILON_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)  # the authors' noise magnitudes


class MahalanobisEnsemble(Detector):
    """Per-layer Mahalanobis distances (optionally on pre-processed inputs), combined linearly."""

    name = "mahalanobis_ensemble"
    needs = frozenset({Need.FEATURES, Need.LAYERS, Need.LABELS, Need.VALIDATION, Need.OOD_VALIDATION})
    grid = {"epsilon": list(EPSILON_GRID)}

    def __init__(self, layers: Sequence[str] | None = None, epsilon: float = 0.0, batch_size: int = 256,
                 epsilons: Sequence[float] | None = None, seed: int = 0):
        self.layers = layers
        self.epsilon = epsilon
        self.batch_size = batch_size
        self.epsilons = epsilons  # candidates compared on (val, ood_val); None: just ``epsilon``
        self.seed = seed  # the validation split of the combination fit

    # -- parameters ---------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.layers is not None and (isinstance(self.layers, str) or len(self.layers) == 0):
            raise ValueError(f"{self.name}: layers must be a non-empty list of layer names (or None for the "
                             f"penultimate features), got {self.layers!r}")
        if not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"{self.name}: epsilon must be >= 0, got {self.epsilon!r}")

    def _all_layers(self) -> list[str]:
        return list(self.layers) if self.layers is not None else [PENULTIMATE]

    def layer_names(self) -> list[str]:
        return [layer for layer in self._all_layers() if layer != PENULTIMATE]

    @staticmethod
    def _values(data: Outputs, layer: str) -> np.ndarray:
        return data.features if layer == PENULTIMATE else data.layers[layer]

    # -- fit ----------------------------------------------------------------------------------------------
    def _fit(self, train: Outputs, val: Outputs | None, ood_val: Outputs | None) -> None:
        n_classes = n_classes_of(train.labels, train.logits)
        self.gaussians_ = [TiedGaussian(self._values(train, layer), train.labels, n_classes,
                                        f"{self.name} (layer {layer!r})") for layer in self._all_layers()]
        self.weights_ = np.ones(len(self.gaussians_))
        self.bias_ = 0.0
        self.epsilon_ = float(self.epsilon)
        if ood_val is not None:
            if val is None:
                raise ValueError(f"{self.name}: ood_val is given without val; the combination is fitted on ID "
                                 "validation data against OOD validation data, pass both")
            self._fit_combination(train, val, ood_val)

    def layer_scores(self, x: Outputs, epsilon: float | None = None) -> np.ndarray:
        """``(N, L)`` squared Mahalanobis distances per layer, after pre-processing with ``epsilon``."""
        epsilon = self.epsilon_ if epsilon is None else epsilon
        if epsilon == 0:
            return np.stack([g.min_distance(self._values(x, layer))
                             for g, layer in zip(self.gaussians_, self._all_layers())], axis=1)
        source = x.get(Need.MODEL, who=f"{self.name} with epsilon={epsilon}")
        return _perturbed_distances(source, self._all_layers(), self.gaussians_, epsilon)

    def _score(self, x: Outputs) -> np.ndarray:
        return self.layer_scores(x) @ self.weights_ + self.bias_

    # -- the validation step: noise magnitude and regression weights --------------------------------------
    def _fit_combination(self, train: Outputs, id_val: Outputs, ood_val: Outputs) -> None:
        """Fit the logistic-regression weights on ID vs OOD validation outputs (Lee et al., Sec. 3.1).

        ``epsilons`` (default: ``[epsilon]``; the paper's grid is :data:`EPSILON_GRID`) are compared by the
        AUROC of a regression fitted on one half of the validation data and evaluated on the other; the best
        becomes ``epsilon_`` and the regression is refitted on all validation data.
        """
        from sklearn.metrics import roc_auc_score

        for data in (id_val, ood_val):
            self._check_inputs(data, fitting=False)
            if self._input_dims(data) != self._input_dims(train):
                raise ValueError(f"{self.name}: {data.name!r} has shapes {self._input_dims(data)} per sample but "
                                 f"the training data {self._input_dims(train)}")
        epsilons = [self.epsilon] if self.epsilons is None else list(self.epsilons)
        rng = np.random.default_rng(self.seed)
        target = np.r_[np.zeros(len(id_val)), np.ones(len(ood_val))]
        half = rng.permutation(len(target)) < len(target) // 2
        best = None
        for epsilon in epsilons:
            scores = np.r_[self.layer_scores(id_val, epsilon), self.layer_scores(ood_val, epsilon)]
            model = _regression(scores[half], target[half])
            auroc = roc_auc_score(target[~half], model.decision_function(scores[~half]))
            if best is None or auroc > best[0]:
                best = (auroc, epsilon, scores)
        self.validation_auroc_, self.epsilon_, scores = best
        model = _regression(scores, target)
        self.weights_, self.bias_ = model.coef_[0].astype(np.float64), float(model.intercept_[0])


def _regression(scores: np.ndarray, target: np.ndarray):
    """Cross-validated logistic regression, as in the authors' code (``LogisticRegressionCV``)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's announced default changes; results unchanged
        return LogisticRegressionCV(max_iter=1000).fit(scores, target)


def _perturbed_distances(source, layers: list[str], gaussians: list[TiedGaussian], epsilon: float) -> np.ndarray:
    """Eq. 4 for every layer: one forward pass, one gradient per layer, one forward pass per perturbed input."""
    import torch

    from ..extraction.rerun import rerun

    std = getattr(source.preprocess, "std", None)
    step_scale = 1.0 if not isinstance(std, torch.Tensor) else (1.0 / std)
    hooked = [layer for layer in layers if layer != PENULTIMATE]
    params = [(torch.as_tensor(g.whitener, dtype=torch.float32), torch.as_tensor(g.whitened_means, dtype=torch.float32))
              for g in gaussians]

    def activation(parts, layer):
        return parts["features"] if layer == PENULTIMATE else parts[layer]

    def score_batch(x, probe):
        x = x.detach().requires_grad_(True)
        out = np.empty((len(x), len(layers)))
        with torch.enable_grad():
            parts = probe(x)
            steps = []
            for i, layer in enumerate(layers):
                whitener, means = (p.to(x.device) for p in params[i])
                z = activation(parts, layer).flatten(1) @ whitener
                closest = torch.cdist(z.detach(), means).argmin(dim=1)
                distance = ((z - means[closest])**2).sum()
                (gradient,) = torch.autograd.grad(-distance, x, retain_graph=i < len(layers) - 1)
                steps.append(gradient.sign() * (step_scale.to(x.device) if torch.is_tensor(step_scale) else 1.0))
        with torch.no_grad():
            for i, layer in enumerate(layers):
                values = activation(probe(x.detach() + epsilon * steps[i]), layer).double().cpu().numpy()
                out[:, i] = gaussians[i].min_distance(values)
        return torch.from_numpy(out)

    return rerun(source, score_batch, layers=hooked)
