"""The generative family's feature-space members: non-linear invariants (volume preservation, the number of
invariants by hand, a planted non-linear invariant recovered) and FlowCon."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oodscope
from oodscope.extraction.outputs import Outputs
from oodscope.generative.nl_invariants import number_of_invariants, volume_preserving_net


def _auroc(s_in, s_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


def test_the_network_preserves_volume_and_inverts_exactly():
    torch.manual_seed(0)
    net = volume_preserving_net(5, layers=3, widths=(1, 2))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    x = torch.randn(4, 5, dtype=torch.float64)
    net = net.double()
    torch.testing.assert_close(net.inverse(net(x)), x)
    jacobian = torch.autograd.functional.jacobian(lambda v: net(v.view(1, 5))[0], x[0])
    assert float(torch.linalg.det(jacobian)) == pytest.approx(1.0, abs=1e-10)
    assert float((jacobian - torch.eye(5, dtype=torch.float64)).abs().max()) > 0.1  # not the identity


def test_number_of_invariants_by_hand():
    rng = np.random.default_rng(0)
    # standard deviations 10, 5, 1, 0.1, 0.01: variances 100, 25, 1, 0.01, 1e-4 -> 95 % needs the first two
    features = rng.normal(size=(20000, 5)) * np.array([10, 5, 1, 0.1, 0.01])
    assert number_of_invariants(features) == 3
    assert number_of_invariants(features, kept=0.995) == 2  # (100 + 25) / 126.0101 = 0.992: a third component


def _paraboloid(n, rng, off=0.0):
    """3-d points with a non-linear invariant ``x_3 = 0.1 (x_1^2 + x_2^2 - 2)`` (noise 0.005): ``x_3`` holds 2 % of
    the variance, so PCA counts one invariant; ``off`` moves ``x_3`` off the surface."""
    x = rng.normal(size=(n, 2))
    x3 = 0.1 * ((x ** 2).sum(axis=1) - 2) + off + rng.normal(0, 0.005, n)
    return np.c_[x, x3]


def test_a_planted_non_linear_invariant_is_learned_and_flags_points_off_the_surface():
    rng = np.random.default_rng(0)
    train, test = _paraboloid(4000, rng), _paraboloid(500, rng)
    off = _paraboloid(500, rng, off=0.1)  # half of x_3's own standard deviation: hidden from a linear view
    detector = oodscope.create("nl_invariants", normalize=False, widths=(4, 4), epochs=30, lr=3e-3,
                               batch_size=128).fit(Outputs(features=train))
    assert detector.invariants_ == 1
    assert detector.loss_history_[-1] < 0.1 * detector.loss_history_[0]
    z = detector._invariant_coordinates(detector._prepared(test))
    assert float(np.mean(z ** 2)) < 0.05 * float(np.var(test[:, 2]))  # the surface is (nearly) a level set
    assert _auroc(detector.score(Outputs(features=test)), detector.score(Outputs(features=off))) > 0.95
    linear = _auroc(np.abs(test[:, 2] - train[:, 2].mean()), np.abs(off[:, 2] - train[:, 2].mean()))
    assert linear < 0.75  # the same points by their distance along the low-variance axis
    with pytest.raises(ValueError, match="no invariant"):
        oodscope.create("nl_invariants", normalize=False).fit(Outputs(features=rng.normal(size=(200, 3))))


# -- FlowCon ------------------------------------------------------------------------------------------------------
def test_flowcon_pairwise_density_and_loss_by_hand():
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    from oodscope.generative.flowcon import flowcon_loss, pairwise_log_density

    rng = np.random.default_rng(0)
    z, mu = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    log_sigma, log_det = rng.normal(0, 0.3, (5, 3)), rng.normal(size=5)
    labels = np.array([0, 0, 1, 1, 2])  # sample 4 has no positive: left out of the contrastive mean
    b = np.array([[multivariate_normal(mu[j], np.diag(np.exp(2 * log_sigma[j]))).logpdf(z[i]) for j in range(5)]
                  for i in range(5)])
    t = {name: torch.from_numpy(v) for name, v in dict(z=z, mu=mu, s=log_sigma, d=log_det).items()}
    np.testing.assert_allclose(pairwise_log_density(t["z"], t["mu"], t["s"]).numpy(), b, rtol=1e-10)
    b = b / (3 * np.log(2))
    own = np.diag(b)
    nll = -np.mean(own + log_det / (3 * np.log(2)))
    a = 1.5 * (b + own[:, None])
    e = (np.exp(a - a.max(axis=1, keepdims=True)) + 1e-5) / 0.1
    con = []
    for i in range(4):
        others = [k for k in range(5) if k != i]
        positives = [j for j in others if labels[j] == labels[i]]
        con.append(-np.mean([e[i, j] - logsumexp(e[i, others]) for j in positives]))
    total, got_nll, got_con = flowcon_loss(t["z"], t["d"], t["mu"], t["s"], torch.from_numpy(labels))
    assert float(got_nll) == pytest.approx(nll, rel=1e-10)
    assert float(got_con) == pytest.approx(np.mean(con), rel=1e-10)
    assert float(total) == pytest.approx(0.07 * nll + np.mean(con), rel=1e-10)


def test_flowcon_log_determinant_is_the_autograd_jacobians():
    from oodscope.generative.flowcon import tabular_flow

    torch.manual_seed(0)
    flow = tabular_flow(5, blocks=4, hidden=8).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    x = torch.randn(1, 5, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 5))[0][0], x[0])
    assert float(flow(x)[1][0].detach()) == pytest.approx(float(torch.linalg.slogdet(jacobian)[1]), rel=1e-10)


def test_flowcon_separates_far_features_and_refuses_bad_training_data(tmp_path):
    from oodscope.persistence import load, save

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 6))
    labels = rng.integers(0, 3, 600)
    train = Outputs(features=centres[labels] + rng.normal(size=(600, 6)), labels=labels)
    test = centres[rng.integers(0, 3, 200)] + rng.normal(size=(200, 6))
    far = rng.normal(0, 3, (200, 6)) + 6.0
    detector = oodscope.create("flowcon", blocks=4, hidden=32, epochs=15, lr=1e-3).fit(train)
    assert detector.loss_history_[-1] < detector.loss_history_[0]
    assert _auroc(detector.score(Outputs(features=test)), detector.score(Outputs(features=far))) > 0.9
    np.testing.assert_array_equal(load(save(detector, tmp_path / "f")).score(Outputs(features=far)),
                                  detector.score(Outputs(features=far)))
    with pytest.raises(ValueError, match="at least 2 training samples"):
        oodscope.create("flowcon").fit(Outputs(features=rng.normal(size=(3, 4)), labels=np.array([0, 1, 2])))
    with pytest.raises(ValueError, match="blocks"):
        oodscope.create("flowcon", blocks=1).fit(train)
