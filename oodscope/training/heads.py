"""Classifier heads that training objectives put in place of a model's last ``nn.Linear``.

Some objectives change the network, not only the loss: DOS adds an absent (K+1-th) class, MOS a group softmax with
an "others" class per group, AbeT a learned input-dependent temperature on a cosine head, ISH a head whose weight
gradient sees shaped activations. Each head here replaces the model's last ``nn.Linear`` (the classifier head that
:func:`oodscope.extract` finds), keeps the penultimate features as its input, and follows one convention:

* in ``joint`` mode (training) its forward returns what the objective's loss needs;
* otherwise (the fine-tuned model handed to :func:`oodscope.extract`) it returns ``K`` class logits, so every
  post-hoc detector runs on it, and passes the method's own statistic through a named ``nn.Identity`` submodule
  (e.g. ``fc.absent_probability``), which ``extract(..., layers=[...])`` records for the method's own detector.

The last ``nn.Linear`` registered in each head takes the penultimate features, so ``extract`` records them as
``features`` (KNN and the other feature detectors run unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def head_name(model: nn.Module) -> str:
    """The qualified name of the model's last ``nn.Linear`` (the classifier head), or a clear error."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head for the objective to replace")
    return names[-1]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted ``name`` (e.g. ``"fc"``, ``"classifier.1"``) to ``module``, in place."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def penultimate(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(features, outputs)``: the head's input and the model's output for ``inputs`` (no gradient, as is)."""
    head = model.get_submodule(head_name(model))
    seen: dict[str, Any] = {}
    handle = head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            outputs = model(inputs)
    finally:
        handle.remove()
    return seen["x"], outputs


class _Head:
    """Mixin: ``joint`` switches the forward between the training outputs and the deployed class logits."""

    joint: bool = False

    def deploy(self):
        self.joint = False
        return self


class AbsentClassHead(_Head, nn.Module):
    """DOS's head. ``joint``: ``(N, K + 1)`` logits (absent class last); deployed: the ``K`` class logits, with
    ``absent_probability`` = ``softmax_{K+1}(z)_{K+1} = sigmoid(z_abs - logsumexp(z_1..K))``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.absent = nn.Linear(linear.in_features, 1)  # registered first: ``classes`` is the last Linear
        nn.init.zeros_(self.absent.weight)
        nn.init.zeros_(self.absent.bias)
        self.classes = linear
        self.absent_probability = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, absent = self.classes(x), self.absent(x)
        if self.joint:
            return torch.cat([logits, absent], dim=1)
        self.absent_probability(torch.sigmoid(absent - logits.logsumexp(dim=1, keepdim=True)))
        return logits


def absent_class_head(linear: nn.Linear) -> AbsentClassHead:
    """DOS's head: the pretrained ``K`` class rows plus one absent-class row (zero-initialised)."""
    return AbsentClassHead(linear)


class GroupSoftmaxHead(_Head, nn.Module):
    """MOS's head. ``joint``: the per-group log-probabilities ``(N, G, W)`` (column 0 = "others", padding =
    -inf); deployed: the ``K`` class logits ``log p_k(c)`` of each class in its own group (their argmax is MOS's
    prediction, the class with the highest within-group probability), with ``others_probability`` =
    ``p_k(others)`` for every group (``N x G``)."""

    def __init__(self, linear: nn.Linear, groups: np.ndarray):
        super().__init__()
        groups = np.asarray(groups, dtype=np.int64)
        n_groups = int(groups.max()) + 1
        if set(groups.tolist()) != set(range(n_groups)):
            raise ValueError(f"groups must number every group 0..{n_groups - 1} with at least one class, got "
                             f"{groups}")
        width = int(np.bincount(groups).max()) + 1
        padded = np.full((n_groups, width), -1, np.int64)  # per group its columns of z, "others" first; -1: pad
        position = np.zeros(len(groups), np.int64)  # class -> its column of z
        flat_index = np.zeros(len(groups), np.int64)  # class -> its place in the flattened (G, W) log-probs
        start = 0
        for g in range(n_groups):  # a loop over groups (a handful), not samples
            members = np.flatnonzero(groups == g)
            padded[g, :len(members) + 1] = start + np.arange(len(members) + 1)
            position[members] = start + 1 + np.arange(len(members))
            flat_index[members] = g * width + 1 + np.arange(len(members))
            start += len(members) + 1
        self.groups = nn.Linear(linear.in_features, start)
        with torch.no_grad():
            self.groups.weight.zero_()
            self.groups.bias.zero_()
            self.groups.weight[position] = linear.weight
            if linear.bias is not None:
                self.groups.bias[position] = linear.bias
        self.register_buffer("padded", torch.from_numpy(padded))
        self.register_buffer("flat_index", torch.from_numpy(flat_index))
        self.others_probability = nn.Identity()

    def group_log_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        gathered = self.groups(x)[:, self.padded.clamp(min=0)]
        return gathered.masked_fill(self.padded < 0, float("-inf")).log_softmax(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = self.group_log_probabilities(x)
        if self.joint:
            return logp
        self.others_probability(logp[:, :, 0].exp())
        return logp.flatten(1)[:, self.flat_index]


def group_softmax_head(linear: nn.Linear, groups: np.ndarray) -> GroupSoftmaxHead:
    """MOS's head: per group ``k`` of classes, one "others" logit and the group's class logits.

    ``groups[c]`` is the group of class ``c``. The class rows start from the pretrained head, the "others" rows at
    zero. Logits are laid out group by group, "others" first (as in the authors' code): ``K + G`` outputs."""
    return GroupSoftmaxHead(linear, groups)


class CosineLinear(nn.Linear):
    """``cos(x, w_c)`` for every class row ``w_c`` (an ``nn.Linear`` so that ``extract`` finds the features as its
    input; it has no bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1, eps=1e-4) @ F.normalize(self.weight, dim=1, eps=1e-4).T


class LearnedTemperatureHead(_Head, nn.Module):
    """AbeT's head: ``logits = cos(phi, w_c) / T(phi)``; ``temperature`` records ``T`` (``N x 1``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.temperature_logit = nn.Linear(linear.in_features, 1)  # registered first
        self.temperature_norm = nn.BatchNorm1d(1)
        self.classes = CosineLinear(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            self.classes.weight.copy_(linear.weight)
        self.temperature = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.temperature_norm(self.temperature_logit(x))) + 1e-12
        self.temperature(t)
        return self.classes(x) / t


def learned_temperature_head(linear: nn.Linear) -> LearnedTemperatureHead:
    """AbeT's head (GODIN's decomposed confidence): cosine class logits divided by a learned temperature.

    ``T(x) = sigmoid(BN(w_T . phi(x) + b_T))`` and ``f_c(x) = cos(phi(x), w_c) / T(x)``; the class directions
    start from the pretrained head's rows."""
    return LearnedTemperatureHead(linear)


def shaped_activations(a: torch.Tensor, percentile: float) -> torch.Tensor:
    """ISH's shaping of the head's input (Xu et al., ICLR 2024, Sec. 4): per sample keep the top
    ``k = int(n (1 - p))`` activations, zero the rest, and multiply the kept ones by ``exp(s1 / s2)`` with
    ``s1`` the sum of all activations and ``s2`` the sum of the kept ones."""
    k = max(1, int(a.shape[1] * (1.0 - percentile)))
    values, index = a.topk(k, dim=1)
    s1, s2 = a.sum(dim=1, keepdim=True), values.sum(dim=1, keepdim=True)
    scale = torch.exp(s1 / s2.clamp(min=1e-12))
    return torch.zeros_like(a).scatter(1, index, values * scale)


class _ISHFunction(torch.autograd.Function):
    """``F.linear`` whose weight gradient is ``grad_out^T shaped(a)``; input and bias gradients as usual."""

    @staticmethod
    def forward(ctx, a, weight, bias, percentile):
        ctx.save_for_backward(a, weight)
        ctx.percentile = percentile
        return F.linear(a, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        a, weight = ctx.saved_tensors
        return grad @ weight, grad.T @ shaped_activations(a, ctx.percentile), grad.sum(dim=0), None


class ISHLinear(_Head, nn.Linear):
    """``nn.Linear`` whose weight gradient (training mode) uses ISH's shaped activations."""

    def __init__(self, in_features: int, out_features: int, percentile: float):
        super().__init__(in_features, out_features, bias=True)
        self.percentile = percentile

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.training:
            return _ISHFunction.apply(a, self.weight, self.bias, self.percentile)
        return super().forward(a)

    def deploy(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=True)
        plain.load_state_dict(self.state_dict())
        return plain


def ish_linear(linear: nn.Linear, percentile: float) -> ISHLinear:
    """The head's ``nn.Linear`` with ISH's backward: the forward is unchanged, the weight gradient is
    ``grad_out^T shaped(a)``; the input and bias gradients are the usual ones. In eval mode a plain linear layer."""
    head = ISHLinear(linear.in_features, linear.out_features, percentile)
    with torch.no_grad():
        head.weight.copy_(linear.weight)
        head.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(linear.out_features))
    return head


class HypersphereHead(_Head, nn.Module):
    """CIDER's and PALM's head: a projection ``g`` of the penultimate features onto the unit hypersphere,
    ``z = g(phi) / ||g(phi)||`` (:meth:`embed`), class prototypes on the sphere (the ``prototypes`` buffer, updated
    by the objective, saved in checkpoints), and the classifier ``classes`` (the model's last ``nn.Linear``).

    ``joint``: the class logits of the *detached* features (an online linear probe: the class head learns, its
    gradient stops at the features, so the representation is the objective's alone); deployed: :meth:`deploy`
    returns ``classes`` itself, the model's original architecture (the papers discard the projection head after
    training and score the penultimate features)."""

    def __init__(self, linear: nn.Linear, dim: int, n_prototypes: int):
        super().__init__()
        width = linear.in_features
        # the authors' "mlp" head: Linear(d, d) -> ReLU -> Linear(d, dim); registered first: ``classes`` is the last
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        self.register_buffer("prototypes", torch.zeros(n_prototypes, dim))
        self.classes = linear

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``z = g(phi) / ||g(phi)||`` (float32 where autocast computes in half precision)."""
        out = self.projection(features)
        return F.normalize(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes(x.detach() if self.joint else x)

    def deploy(self) -> nn.Linear:
        return self.classes


def hypersphere_head(linear: nn.Linear, dim: int, n_prototypes: int) -> HypersphereHead:
    """CIDER's / PALM's head: a two-layer projection to ``dim`` dimensions on the unit sphere and
    ``n_prototypes`` prototype rows (zero until the objective sets them) next to the model's classifier."""
    return HypersphereHead(linear, dim, n_prototypes)


class OutlierLogitHead(_Head, nn.Module):
    """SAL's head: a logistic-regression unit ``s(phi) = w . phi + b`` (ID vs. outlier) next to the class head.
    ``joint``: ``(N, K + 1)`` = the class logits and ``s`` last; deployed: the ``K`` class logits, with
    ``ood_probability`` = ``sigmoid(-s)`` (``N x 1``, the probability of "outlier")."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.outlier = nn.Linear(linear.in_features, 1)  # registered first: ``classes`` is the last Linear
        self.classes = linear
        self.ood_probability = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, s = self.classes(x), self.outlier(x)
        if self.joint:
            return torch.cat([logits, s], dim=1)
        self.ood_probability(torch.sigmoid(-s))
        return logits


def outlier_logit_head(linear: nn.Linear) -> OutlierLogitHead:
    """SAL's head: the pretrained class rows plus a binary ID-vs-outlier logistic unit (torch's default init)."""
    return OutlierLogitHead(linear)


class EnergyLogisticHead(_Head, nn.Module):
    """SCONE's head: the class head ``classes`` and a logistic unit on the negative free energy,
    ``s(x) = w * logsumexp_c f_c(x) + b`` (``logistic``, the authors' ``nn.Linear(1, 1)``), plus the state of the
    augmented-Lagrangian solver in buffers (saved in checkpoints): ``multipliers`` ``(lambda_in, lambda_ce)``,
    ``penalties`` ``(beta_in, beta_ce)`` and ``ce_reference`` (the training-set cross-entropy before fine-tuning).
    The forward returns the class logits in both modes; deployed: :meth:`deploy` returns ``classes`` itself (the
    paper scores the energy of the class logits)."""

    def __init__(self, linear: nn.Linear, penalties: tuple[float, float] = (1.0, 1.0), oriented: bool = True):
        super().__init__()
        self.oriented = oriented
        self.logistic = nn.Linear(1, 1)  # registered first: ``classes`` is the last Linear
        self.register_buffer("multipliers", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("penalties", torch.tensor(penalties, dtype=torch.float64))
        self.register_buffer("ce_reference", torch.zeros((), dtype=torch.float64))
        self.classes = linear

    def energy_logit(self, lse: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """``s = w (lse - shift) + b`` for a vector of ``logsumexp`` values (float32 under autocast); ``w`` is
        used as ``-|w|`` when ``oriented`` (``s`` falls as ``lse`` rises, the energy score's orientation)."""
        lse = lse.float() if lse.dtype in (torch.float16, torch.bfloat16) else lse
        weight = -self.logistic.weight.abs() if self.oriented else self.logistic.weight
        return F.linear((lse - shift)[:, None].to(weight.dtype), weight, self.logistic.bias).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes(x)

    def deploy(self) -> nn.Linear:
        return self.classes


def energy_logistic_head(linear: nn.Linear, penalties: tuple[float, float] = (1.0, 1.0),
                         oriented: bool = True) -> EnergyLogisticHead:
    """SCONE's head: the pretrained classifier plus a 1-d logistic unit on ``logsumexp`` of its logits (torch's
    default initialisation, as the authors' ``nn.Linear(1, 1)``) and the multiplier/penalty buffers."""
    return EnergyLogisticHead(linear, penalties, oriented)


def z_score(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per sample, ``(x - mean) / (std + eps)`` over the feature dimension (``std`` with Bessel's correction,
    torch's default, as the ASCOOD code's ``z_std``)."""
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)


class StandardisedHead(_Head, nn.Module):
    """ASCOOD's head: the class head on z-scored penultimate features, ``f(x) = W (sigma z(phi)) + b``, in training
    and once deployed (the network keeps it: its logits are those of the standardised features). ``extract``
    records the standardised ``sigma z(phi)`` as ``features`` (the input of ``classes``, the last Linear)."""

    def __init__(self, linear: nn.Linear, sigma: float):
        super().__init__()
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.classes = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes(z_score(x) * self.sigma.to(x.dtype))


def standardised_head(linear: nn.Linear, sigma: float) -> StandardisedHead:
    """ASCOOD's head: z-score normalisation of the features, scaled by ``sigma``, before the pretrained classifier."""
    return StandardisedHead(linear, sigma)
