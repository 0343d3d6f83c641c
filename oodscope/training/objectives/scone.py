"""SCONE: margin-constrained energy learning on wild data with covariate- and semantic-shifted samples.

Bai, Canal, Du, Kwon, Nowak & Li, "Feed Two Birds with One Scone: Exploiting Wild Data for Both
Out-of-Distribution Generalization and Detection", ICML 2023 (Sec. 4, the constrained problem; the surrogate, the
solver and the defaults from the authors' ``CIFAR/train.py`` and ``CIFAR/run.sh``).

**Wild data** (Sec. 3): ``P_wild = (1 - pi_c - pi_s) P_in + pi_c P_in^covariate + pi_s P_out``, unlabelled; built
by :func:`scone_wild_mixture`, seeded: ``n_wild`` images (default: as many as the ID training images), of which a
share ``pi_c`` are ID training images through a common corruption (``corruption`` at ``severity``, default
Gaussian noise at severity 5 from :mod:`oodscope.data.corruptions`, the code's ``--cortype gaussian_noise``), a
share ``pi_s`` auxiliary outliers (``tin_aux_train.npz``), the rest clean ID training images; ``pi_c = 0.5``,
``pi_s = 0.1`` (``run.sh``'s ``pi_1``, ``pi_2``). The code mixes each wild batch by Bernoulli masks at the same
proportions; here the pool has them and the engine draws uniformly from it.

**Objective** (Sec. 4): with an OOD logit on the negative free energy, ``s(x) = w * logsumexp_c f_c(x) + b``
(the code's ``logistic_regression``, a learned ``nn.Linear(1, 1)``), and the sigmoid as the smooth 0/1 loss,

    ``min  L_wild = E_wild[ sigmoid(-(w (lse(x) - eta) + b)) ]``     (classify the wild data as OOD)
    ``s.t. c_in = E_in[ sigmoid(s(x)) ] - alpha <= 0``               (ID false alarms <= alpha, with the margin)
    ``     c_ce = E_in[ CE(f(x), y) ] - ce_tol * CE_0 <= 0``          (ID classification risk)

``eta = -10`` (``run.sh``): the wild sample must sit ``|eta|`` energy units beyond the point where an ID sample
counts as a false alarm (for the learned ``w < 0``), the paper's ID energy margin; ``alpha = 0.05``
(``--false_alarm_cutoff``); ``CE_0`` = the cross-entropy of the model on the (un-augmented) training set before
fine-tuning, ``ce_tol = 2``. Note that the cross-entropy enters only as a constraint, as in the code.

**Solver**: the augmented Lagrangian method, which the paper uses for the constrained problem (the details from the
code's ``scone`` branch). Each step minimises

    ``L = psi(c_ce, lambda_ce, beta_ce) + gamma * L_wild + psi(c_in, lambda_in, beta_in)``,
    ``psi(c, lambda, beta) = lambda c + beta / 2 c^2``  if ``beta c + lambda >= 0``, else ``-lambda^2 / (2 beta)``

on the batch (``gamma = 1``, ``--out_constraint_weight``). After every epoch both constraints are measured on the
training set (up to ``n_reference`` images, eval mode, no augmentation; :meth:`SCONE.end_epoch`) and, with the epoch's ``c``, the multipliers and
penalties are updated as in the code: ``lambda += lr_lam c`` if ``beta c + lambda >= 0`` else
``lambda -= lr_lam lambda / beta``; then ``beta *= penalty_mult`` if ``c > constraint_tol`` (``lr_lam = 1``,
``penalty_mult = 1.5``, ``constraint_tol = 0``, both ``beta`` start at 1 (``in_penalty``, ``ce_penalty``: the
code's ``--in_constraint_weight``, ``--ce_constraint_weight``), both ``lambda`` at 0):
:func:`alm_update`. The multipliers, penalties and ``CE_0`` live in the head's buffers, so a resumed run continues
with them. Scored with the energy, as in the code.

**One deviation** (``oriented=True``, the default): the unit's weight is used as ``-|w|``, so ``s`` always
decreases with ``logsumexp`` (the energy score's orientation). Only then is ``eta`` the paper's margin: with
``w < 0`` a wild sample counts as OOD below ``t - |eta|`` and an ID sample as a false alarm below ``t``
(``t = b / |w|``), so ID energies must clear the wild data's boundary by ``|eta|``. The code's free ``w`` can
turn positive, and then the same terms ask only that ID lie below ``t`` and the wild data above ``t - |eta|``, no
margin at all; on short fine-tuning runs it does turn (the wild inputs ``lse - eta`` exceed the ID ones, so the
unit's own gradient favours ``w > 0``). ``oriented=False`` gives the code's free sign. The code fine-tunes a pretrained WideResNet-40-2 for 100 epochs
at lr 1e-4 (step decay); here the engine's schedule. The labelled ID images and the wild ID images are the same
training images here (the code holds out half of the training set as the wild ID part).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...extraction.outputs import Need
from ..objective import Objective, check_positive

WILD_ID, WILD_COVARIATE, WILD_SEMANTIC = 0, 1, 2  # kinds of wild samples


def check_proportions(who: str, pi_c: Any, pi_s: Any) -> None:
    """``pi_c``, ``pi_s`` numbers in [0, 1] with ``pi_c + pi_s <= 1`` and ``pi_s > 0`` (the wild data must hold
    semantic outliers)."""
    for name, value in (("pi_c", pi_c), ("pi_s", pi_s)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
            raise ValueError(f"{who}: {name} (a share of the wild data) must lie in [0, 1], got {value!r}")
    if pi_c + pi_s > 1:
        raise ValueError(f"{who}: pi_c + pi_s = {pi_c + pi_s:g} is over 1; the shares of covariate-shifted and "
                         "semantic samples in the wild data must sum to at most 1")
    if pi_s == 0:
        raise ValueError(f"{who}: pi_s = 0 leaves the wild data without semantic outliers; SCONE needs them "
                         "(e.g. pi_s = 0.1)")


def scone_wild_mixture(id_images: np.ndarray, outliers: np.ndarray | None, pi_c: float, pi_s: float,
                       corruption: str = "gaussian_noise", severity: int = 5, n_wild: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(wild images, kind)``: ``n_wild`` images (default ``len(id_images)``), ``round(pi_s n)`` auxiliary outliers
    (kind 2, without replacement), ``round(pi_c n)`` ID images through ``corruption`` at ``severity`` (kind 1) and
    the rest clean ID images (kind 0); the ID images of kinds 0 and 1 are distinct; shuffled, seeded."""
    from ...data.corruptions import corrupt

    check_proportions("scone wild data", pi_c, pi_s)
    if outliers is None or len(outliers) == 0:
        raise ValueError("scone wild data: needs auxiliary semantic outliers (e.g. tin_aux_train.npz); got none")
    if len(id_images) == 0:
        raise ValueError("scone wild data: no ID images")
    n = len(id_images) if n_wild is None else int(n_wild)
    n_s, n_c = int(round(pi_s * n)), int(round(pi_c * n))
    n_id = n - n_s - n_c
    if n_s < 1:
        raise ValueError(f"scone wild data: pi_s = {pi_s} of {n} wild images leaves no outlier; raise pi_s or n_wild")
    if n_s > len(outliers):
        raise ValueError(f"scone wild data: pi_s = {pi_s} of {n} wild images needs {n_s} outliers, only "
                         f"{len(outliers)} given; lower n_wild or pi_s")
    if n_c + n_id > len(id_images):
        raise ValueError(f"scone wild data: {n} wild images need {n_c + n_id} distinct ID images, only "
                         f"{len(id_images)} given; lower n_wild")
    rng = np.random.default_rng(seed)
    ids = rng.choice(len(id_images), n_c + n_id, replace=False)
    outs = rng.choice(len(outliers), n_s, replace=False)
    shifted = corrupt(id_images[ids[:n_c]], corruption, severity, seed=seed) if n_c else id_images[:0]
    images = np.concatenate([id_images[ids[n_c:]], shifted, outliers[outs]])
    kind = np.repeat([WILD_ID, WILD_COVARIATE, WILD_SEMANTIC], [n_id, n_c, n_s]).astype(np.int64)
    order = rng.permutation(len(images))
    return images[order], kind[order]


def alm_penalty(c, multiplier: float, penalty: float):
    """The augmented-Lagrangian term of an inequality constraint ``c <= 0``: ``lambda c + beta / 2 c^2`` if
    ``beta c + lambda >= 0``, else the constant ``-lambda^2 / (2 beta)`` (works on floats and tensors)."""
    value = c.detach() if hasattr(c, "detach") else c
    if float(penalty * value + multiplier) >= 0:
        return c * multiplier + penalty / 2 * c * c
    return 0 * c - multiplier ** 2 / (2 * penalty)


def alm_update(c: float, multiplier: float, penalty: float, lr_lam: float = 1.0, penalty_mult: float = 1.5,
               constraint_tol: float = 0.0) -> tuple[float, float]:
    """``(lambda', beta')`` after an epoch with constraint value ``c`` (the authors' update): ``lambda + lr_lam c``
    if ``beta c + lambda >= 0`` else ``lambda - lr_lam lambda / beta``; ``beta * penalty_mult`` if
    ``c > constraint_tol`` else ``beta``."""
    if c * penalty + multiplier >= 0:
        multiplier = multiplier + lr_lam * c
    else:
        multiplier = multiplier - lr_lam * multiplier / penalty
    return multiplier, penalty * penalty_mult if c > constraint_tol else penalty


class SCONE(Objective):
    """Wild data as OOD s.t. an ID energy margin and an ID risk constraint, solved by the augmented Lagrangian."""

    name = "scone"
    needs = frozenset({Need.LABELS, Need.OUTLIERS})
    score = "energy"

    def __init__(self, pi_c: float = 0.5, pi_s: float = 0.1, eta: float = -10.0, alpha: float = 0.05,
                 ce_tol: float = 2.0, out_weight: float = 1.0, in_penalty: float = 1.0, ce_penalty: float = 1.0,
                 lr_lam: float = 1.0, penalty_mult: float = 1.5, constraint_tol: float = 0.0,
                 corruption: str = "gaussian_noise", severity: int = 5, n_wild: int | None = None,
                 n_reference: int = 10000, oriented: bool = True):
        self.pi_c = pi_c
        self.pi_s = pi_s
        self.eta = eta
        self.alpha = alpha
        self.ce_tol = ce_tol
        self.out_weight = out_weight
        self.in_penalty = in_penalty
        self.ce_penalty = ce_penalty
        self.lr_lam = lr_lam
        self.penalty_mult = penalty_mult
        self.constraint_tol = constraint_tol
        self.corruption = corruption
        self.severity = severity
        self.n_wild = n_wild
        self.n_reference = n_reference
        self.oriented = oriented

    def check_params(self) -> None:
        from ...data.corruptions import CORRUPTIONS

        check_proportions(self.name, self.pi_c, self.pi_s)
        if not (isinstance(self.eta, (int, float)) and not isinstance(self.eta, bool) and math.isfinite(self.eta)):
            raise ValueError(f"{self.name}: eta (the energy margin) must be a finite number, got {self.eta!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            raise ValueError(f"{self.name}: alpha (the allowed ID false-alarm rate) must lie in (0, 1), got "
                             f"{self.alpha!r}")
        for name in ("ce_tol", "out_weight", "in_penalty", "ce_penalty", "lr_lam", "n_reference"):
            check_positive(self.name, name, getattr(self, name))
        if not (isinstance(self.penalty_mult, (int, float)) and self.penalty_mult >= 1):
            raise ValueError(f"{self.name}: penalty_mult must be a number >= 1, got {self.penalty_mult!r}")
        if not (isinstance(self.constraint_tol, (int, float)) and math.isfinite(self.constraint_tol)):
            raise ValueError(f"{self.name}: constraint_tol must be a finite number, got {self.constraint_tol!r}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"{self.name}: unknown corruption {self.corruption!r}; known: {', '.join(CORRUPTIONS)}")
        if self.severity not in (1, 2, 3, 4, 5):
            raise ValueError(f"{self.name}: severity must be 1-5, got {self.severity!r}")
        if self.n_wild is not None:
            check_positive(self.name, "n_wild", self.n_wild)

    def outliers_per_step(self, batch_size: int, outlier_batch_size: int) -> int:
        return batch_size  # a wild batch as large as the ID batch, as in the code

    def adapt(self, model, n_classes: int, train, preprocess) -> Any:
        from ..heads import energy_logistic_head, head_name, replace_module

        name = head_name(model)
        head = energy_logistic_head(model.get_submodule(name), (float(self.in_penalty), float(self.ce_penalty)),
                                    oriented=bool(self.oriented))
        head.to(next(model.parameters()).device)
        head.joint = True
        replace_module(model, name, head)
        self.head_name_, self.head_ = name, head
        return model

    def _constraint_terms(self, model, train, preprocess) -> tuple[float, float]:
        """``(E_in[sigmoid(s(x))], E_in[CE])`` over up to ``n_reference`` training images (a fixed subsample), the
        model in eval mode, no augmentation."""
        import torch
        from torch.nn import functional as F

        from ...extraction.extract import evaluation_mode

        images, labels = train
        pick = np.sort(np.random.default_rng(0).permutation(len(images))[:int(self.n_reference)])
        device = next(model.parameters()).device
        sig, ce = [], []
        with evaluation_mode(model):
            with torch.no_grad():
                for rows in np.array_split(pick, max(1, len(pick) // 500)):
                    logits = model(preprocess(torch.from_numpy(images[rows]).to(device))).double()
                    target = torch.from_numpy(labels[rows]).to(device)
                    sig.append(torch.sigmoid(self.head_.energy_logit(logits.logsumexp(dim=1)).double()).cpu())
                    ce.append(F.cross_entropy(logits, target, reduction="none").cpu())
        return float(torch.cat(sig).mean()), float(torch.cat(ce).mean())

    def prepare_outliers(self, model, train, outliers, preprocess, seed: int) -> Any:
        images, _ = train
        wild, kind = scone_wild_mixture(images, outliers, self.pi_c, self.pi_s, self.corruption, self.severity,
                                        self.n_wild, seed)
        _, ce_0 = self._constraint_terms(model, train, preprocess)
        self.head_.ce_reference.fill_(ce_0)
        self.wild_ = {"wild": int(len(wild)), **{name: int((kind == k).sum()) for name, k in
                                                  (("id", WILD_ID), ("covariate", WILD_COVARIATE),
                                                   ("semantic", WILD_SEMANTIC))}, "ce_reference": ce_0}
        return wild

    def end_epoch(self, model, train, preprocess) -> dict[str, float]:
        head = self.head_
        in_term, ce = self._constraint_terms(model, train, preprocess)
        constraints = (in_term - self.alpha, ce - self.ce_tol * float(head.ce_reference))
        for i, c in enumerate(constraints):
            multiplier, penalty = alm_update(c, float(head.multipliers[i]), float(head.penalties[i]), self.lr_lam,
                                             self.penalty_mult, self.constraint_tol)
            head.multipliers[i], head.penalties[i] = multiplier, penalty
        return {"c_in": constraints[0], "c_ce": constraints[1], "lambda_in": float(head.multipliers[0]),
                "lambda_ce": float(head.multipliers[1]), "beta_in": float(head.penalties[0]),
                "beta_ce": float(head.penalties[1])}

    def loss(self, logits, labels, outlier_logits=None, **context):
        import torch
        from torch.nn import functional as F

        head = self.head_
        lam_in, lam_ce = (float(v) for v in head.multipliers)
        beta_in, beta_ce = (float(v) for v in head.penalties)
        ce = F.cross_entropy(logits, labels)
        in_term = torch.sigmoid(head.energy_logit(logits.logsumexp(dim=1))).mean()
        wild = torch.sigmoid(-head.energy_logit(outlier_logits.logsumexp(dim=1), self.eta)).mean()
        c_in = in_term - self.alpha
        c_ce = ce - self.ce_tol * float(head.ce_reference)
        psi_in, psi_ce = alm_penalty(c_in, lam_in, beta_in), alm_penalty(c_ce, lam_ce, beta_ce)
        total = psi_ce + self.out_weight * wild + psi_in
        return total, {"ce": float(ce.detach()), "in_sigmoid": float(in_term.detach()),
                       "wild_sigmoid": float(wild.detach())}
