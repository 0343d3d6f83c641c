"""Training-time OOD II, representation learning on the hypersphere: CIDER and PALM. Loss terms and prototype
updates on fixed tensors computed by hand (and against a plain-numpy transcription of the authors' algorithm),
the engine's features hook, fine-tuning on a toy problem, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.training import finetune
from oodscope.training.heads import hypersphere_head
from oodscope.training.objectives.cider import compactness_loss, dispersion_loss, ema_update
from oodscope.training.objectives.palm import (mle_loss, prototype_contrastive_loss, prototype_update, sinkhorn,
                                                top_k_mask)

from test_training import TOY, _mlp, _toy, tiny_cli_bench  # noqa: F401  (a fixture)


def _unit(*v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


# -- CIDER -----------------------------------------------------------------------------------------------------
def test_cider_prototype_update_is_the_sequential_ema_hand_computed():
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    # by hand, sample by sample (alpha = 0.5): mu_0 <- N(.5 (1,0) + .5 (0,1)); mu_1 <- N(.5 (0,1) + .5 (1,0));
    # mu_0 <- N(.5 mu_0 + .5 (0.6, 0.8))
    s = 1 / math.sqrt(2)
    mu0 = _unit(0.5 * s + 0.3, 0.5 * s + 0.4)
    out = ema_update(mu, z, labels, 0.5)
    assert np.allclose(out.numpy(), [mu0, [s, s]], atol=1e-12)
    assert torch.equal(mu, torch.eye(2, dtype=torch.float64))  # the input is not modified
    # alpha = 0 puts every prototype on its class's last sample; a class absent from the batch keeps its prototype
    z3 = torch.cat([z, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    out = ema_update(torch.eye(3, dtype=torch.float64), z3, labels, 0.0)
    assert np.allclose(out.numpy(), [[0.6, 0.8, 0], [1, 0, 0], [0, 0, 1]])


def test_cider_compactness_and_dispersion_hand_computed():
    tau = 0.1
    mu = torch.tensor([_unit(1, 0), _unit(1, 1)], dtype=torch.float64)
    z = torch.tensor([_unit(1, 2), _unit(3, -1)], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    dots = [[sum(a * b for a, b in zip(zi, m)) for m in mu.tolist()] for zi in z.tolist()]
    nll = [math.log(sum(math.exp(d / tau) for d in row)) - row[y] / tau for row, y in zip(dots, [1, 0])]
    assert float(compactness_loss(z, mu, labels, tau)) == pytest.approx((tau / 0.07) * np.mean(nll), rel=1e-12)
    # two prototypes: each has one other, log(1/1 exp(mu_0 . mu_1 / tau)) = mu_0 . mu_1 / tau
    assert float(dispersion_loss(mu, tau)) == pytest.approx(s := (1 / math.sqrt(2)) / tau, rel=1e-12) and s > 0
    three = torch.tensor([_unit(1, 0, 0), _unit(0, 1, 0), _unit(1, 1, 0)], dtype=torch.float64)
    g = three @ three.T / tau
    hand = np.mean([math.log((math.exp(g[i, j]) + math.exp(g[i, k])) / 2) for i, j, k in
                    ((0, 1, 2), (1, 0, 2), (2, 0, 1))])
    assert float(dispersion_loss(three, tau)) == pytest.approx(hand, rel=1e-12)


def _identity_head(n_prototypes=2, dim=2):
    """A hypersphere head whose projection is the identity on positive features (embed = normalise)."""
    head = hypersphere_head(nn.Linear(dim, 2), dim, n_prototypes).double()
    with torch.no_grad():
        for layer in (head.projection[0], head.projection[2]):
            layer.weight.copy_(torch.eye(dim))
            layer.bias.zero_()
    return head


def test_cider_loss_is_dispersion_plus_lambda_compactness_plus_the_probe_and_updates_the_buffer():
    objective = oodscope.create("cider", proto_m=0.5, dim=2)
    head = _identity_head()
    head.prototypes.copy_(torch.eye(2))
    objective.head_, objective.n_classes_ = head, 2
    features = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    logits = head.classes(features.detach())
    total, terms = objective.loss(logits, labels, features=features)
    s = 1 / math.sqrt(2)
    mu = torch.tensor([_unit(0.5 * s + 0.3, 0.5 * s + 0.4), [s, s]], dtype=torch.float64)
    assert np.allclose(head.prototypes.numpy(), mu.numpy())  # the EMA is stored, detached
    assert not head.prototypes.requires_grad
    comp = float(compactness_loss(features.detach(), mu, labels, 0.1))
    dis = float(dispersion_loss(mu, 0.1))
    probe = float(nn.functional.cross_entropy(logits, labels).detach())
    assert terms == pytest.approx({"comp": comp, "dis": dis, "probe_ce": probe})
    assert float(total) == pytest.approx(dis + 2.0 * comp + probe)
    # the probe's gradient stops at the features: the representation's gradient is the same without it
    total.backward()
    with_probe = features.grad.clone()
    features.grad = None
    head.prototypes.copy_(torch.eye(2))
    no_probe = oodscope.create("cider", proto_m=0.5, dim=2, probe=False)
    no_probe.head_, no_probe.n_classes_ = head, 2
    no_probe.loss(logits, labels, features=features)[0].backward()
    assert torch.allclose(with_probe, features.grad)


def test_cider_fine_tunes_a_compact_dispersed_embedding_and_deploys_the_original_architecture():
    x, y, outliers = _toy()
    model = _mlp()
    tuned, history = finetune(model, (x, y), oodscope.create("cider", dim=8), **TOY)
    first, last = history.epochs[0], history.epochs[-1]
    assert last["comp"] < first["comp"] and last["dis"] < first["dis"]
    assert tuned.state_dict().keys() == model.state_dict().keys()  # projection head dropped, classifier kept
    assert (tuned(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95  # the online probe
    again, _ = finetune(model, (x, y), oodscope.create("cider", dim=8), **TOY)
    assert all(torch.equal(tuned.state_dict()[k], again.state_dict()[k]) for k in model.state_dict())
    # its paper's score, KNN on the penultimate features, runs on the fine-tuned model through extract
    detector = oodscope.create("cider").score_detector()
    assert detector.name == "knn"
    options = dict(use_cache=False, progress=False)
    detector.fit(oodscope.extract(tuned, (x, y), **options))
    _, _, test_out = _toy(seed=1)
    s_in = detector.score(oodscope.extract(tuned, x[:100], **options))
    s_out = detector.score(oodscope.extract(tuned, test_out[:100], **options))
    assert np.median(s_out) > np.median(s_in)


def test_the_engine_hands_features_with_their_gradient_only_to_objectives_that_ask(monkeypatch):
    x, y, outliers = _toy()
    from oodscope.training.objectives.cider import CIDER
    from oodscope.training.objectives.oe import OutlierExposure

    seen = {}
    original = CIDER.loss

    def spy(self, logits, labels, outlier_logits=None, **kwargs):
        seen.setdefault("shape", tuple(kwargs["features"].shape))
        seen.setdefault("grad", kwargs["features"].requires_grad)
        return original(self, logits, labels, outlier_logits, **kwargs)

    monkeypatch.setattr(CIDER, "loss", spy)
    finetune(_mlp(), (x, y), "cider", **{**TOY, "epochs": 1})
    assert seen == {"shape": (32, 32), "grad": True}  # batch 32, the 32-d penultimate features of the MLP
    oe_loss = OutlierExposure.loss
    monkeypatch.setattr(OutlierExposure, "loss", lambda self, *a, **kw: (
        pytest.fail("features given to OE") if kw else oe_loss(self, *a)))
    finetune(_mlp(), (x, y), "oe", outliers=outliers, **{**TOY, "epochs": 1})


def test_cider_resumes_with_its_prototypes_from_the_checkpoint(tmp_path):
    x, y, _ = _toy()
    full, _ = finetune(_mlp(), (x, y), oodscope.create("cider", dim=4), **{**TOY, "epochs": 2})
    finetune(_mlp(), (x, y), oodscope.create("cider", dim=4), checkpoint_dir=tmp_path, **{**TOY, "epochs": 2})
    saved = torch.load(tmp_path / "finetune.pt", weights_only=True)["model"]
    assert saved["3.prototypes"].shape == (3, 4)
    assert torch.allclose(saved["3.prototypes"].norm(dim=1), torch.ones(3))


# -- PALM ------------------------------------------------------------------------------------------------------
def _sinkhorn_reference(z, protos, eps=0.05, iters=3):
    """The authors' algorithm, transcribed to plain numpy: K x B matrix, rows then columns, times B."""
    q = np.exp(z @ protos.T / eps).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def _palm_fixture(seed=0, b=7, n_classes=2, per_class=3, dim=3):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(b, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    protos = rng.random((n_classes * per_class, dim))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, b)
    classes = np.tile(np.arange(n_classes), per_class)
    return z, protos, labels, classes


def test_palm_sinkhorn_matches_the_reference_and_its_marginals():
    z, protos, _, _ = _palm_fixture()
    q = sinkhorn(torch.from_numpy(z), torch.from_numpy(protos)).numpy()
    assert np.allclose(q, _sinkhorn_reference(z, protos), rtol=1e-10)
    assert np.allclose(q.sum(axis=1), 1.0)  # the last scaling: every sample's weights sum to 1


def test_palm_prototype_update_and_losses_with_one_prototype_per_class_hand_computed():
    # one prototype per class, k = 1: every sample is assigned to its class's prototype with weight 1, so the
    # update is the class mean, the MLE loss is the cross-entropy of z . p / tau, as worked out here by hand
    z = torch.tensor([_unit(1, 2), _unit(2, 1), _unit(-1, 1)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    classes = torch.arange(2)
    same = (labels[:, None] == classes[None, :]).double()
    updated, keep = prototype_update(protos, z, same, k=1, momentum=0.9)
    mean0 = [(a + b) / 2 for a, b in zip(_unit(1, 2), _unit(2, 1))]
    expected = [_unit(0.9 + 0.1 * mean0[0], 0.1 * mean0[1]), _unit(0.1 * _unit(-1, 1)[0], 0.9 + 0.1 * _unit(-1, 1)[1])]
    assert np.allclose(updated.numpy(), expected, atol=1e-12)
    assert torch.equal(keep, same)
    tau = 0.1
    dots = (z @ updated.T).tolist()
    ce = np.mean([math.log(sum(math.exp(d / tau) for d in row)) - row[y] / tau for row, y in zip(dots, [0, 0, 1])])
    assert float(mle_loss(z, updated, same, keep, tau)) == pytest.approx(ce, rel=1e-10)


def test_palm_prototype_update_matches_the_reference_with_top_k_soft_assignments():
    z, protos, labels, classes = _palm_fixture(seed=3)
    k, m = 2, 0.99
    same = (labels[:, None] == classes[None, :]).astype(float)
    # reference, plain numpy: weights on the same class, top-k per sample, normalise rows then columns
    w = same * _sinkhorn_reference(z, protos)
    top = np.argsort(-w, axis=1)[:, :k]
    mask = np.zeros_like(w)
    np.put_along_axis(mask, top, 1.0, axis=1)
    u = mask * w
    u = u / u.sum(axis=1, keepdims=True)
    u = u / np.maximum(u.sum(axis=0, keepdims=True), 1e-12)
    ref = m * protos + (1 - m) * u.T @ z
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    updated, keep = prototype_update(torch.from_numpy(protos), torch.from_numpy(z), torch.from_numpy(same), k, m)
    assert np.allclose(updated.numpy(), ref, rtol=1e-10) and np.array_equal(keep.numpy(), mask)
    unused = np.flatnonzero(u.sum(axis=0) == 0)  # a prototype no sample chose keeps its direction
    assert np.allclose(updated.numpy()[unused], protos[unused])
    assert (keep.sum(dim=1) == k).all() and float((keep * torch.from_numpy(1 - same)).sum()) == 0


def test_palm_prototype_contrastive_loss_hand_computed():
    # two classes x two prototypes in the plane; positives: the other prototype of the same class
    p = torch.tensor([_unit(1, 0), _unit(0, 1), _unit(1, 0.2), _unit(-0.3, 1)], dtype=torch.float64)
    classes = torch.tensor([0, 1, 0, 1])
    g = (p @ p.T / 0.5).tolist()
    partner = {0: 2, 1: 3, 2: 0, 3: 1}
    hand = -np.mean([g[i][partner[i]] - math.log(sum(math.exp(g[i][j]) for j in range(4) if j != i))
                     for i in range(4)])
    assert float(prototype_contrastive_loss(p, classes)) == pytest.approx(hand, rel=1e-12)


def test_top_k_mask_zero_keeps_everything():
    w = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.0, 0.9]])
    assert torch.equal(top_k_mask(w, 0), torch.ones_like(w))
    assert torch.equal(top_k_mask(w, 1), torch.tensor([[0.0, 1, 0], [0, 0, 1]]))


def test_palm_fine_tunes_with_mixture_prototypes_and_is_scored_with_mahalanobis():
    x, y, _ = _toy()
    objective = oodscope.create("palm", n_prototypes=3, k=2, dim=8)
    tuned, history = finetune(_mlp(), (x, y), objective, **TOY)
    assert history.epochs[-1]["mle"] < history.epochs[0]["mle"]
    assert objective.head_.prototypes.shape == (9, 8)  # 3 classes x 3 prototypes
    assert (tuned(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95
    assert objective.score_detector().name == "mahalanobis"


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective, message", [
    (dict(name="palm", n_prototypes=200), r"200 prototypes per class but classes \[0, 1, 2\] have only"),
    (dict(name="palm", dim=0), "dim .* must be an integer >= 1"),
    (dict(name="cider", dim=2.5), "dim .* must be an integer >= 1"),
    (dict(name="cider", proto_m=1.0), r"proto_m .* must lie in \[0, 1\)"),
    (dict(name="palm", k=7), r"k .* must be an integer in \[0, n_prototypes = 6\]"),
    (dict(name="palm", n_prototypes=0), "n_prototypes .* must be an integer >= 1"),
    (dict(name="cider", temperature=0.0), "temperature must be a number > 0"),
    (dict(name="palm", epsilon=-1.0), "epsilon must be a number > 0"),
])
def test_bad_hypersphere_settings_are_refused_before_any_training_step(objective, message, monkeypatch):
    x, y, _ = _toy(n=300)  # about 100 images per class
    from oodscope.training.objectives.cider import CIDER

    monkeypatch.setattr(CIDER, "loss", lambda *a, **k: pytest.fail("a training step ran"))
    with pytest.raises(ValueError, match=message):
        finetune(_mlp(), (x, y), oodscope.create(objective.pop("name"), **objective), **TOY)


def test_a_class_without_training_images_is_refused():
    x, y, _ = _toy()
    keep = y != 2
    with pytest.raises(ValueError, match=r"classes \[2\] have no training image"):
        finetune(_mlp(), (x[keep], y[keep]), "cider", **TOY)


def test_train_cli_runs_cider_and_refuses_palm_with_more_prototypes_than_images(tmp_path, capsys, tiny_cli_bench):
    from oodscope.cli import main
    from oodscope.results_io import read_results

    bench, weights, _ = tiny_cli_bench
    args = ["train", str(bench), "--model", "cifar10_resnet20", "--weights", str(weights), "--epochs", "1",
            "--max-steps", "2", "--train-batch-size", "8", "--detectors", "msp",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args + ["--method", "cider", "--out", str(tmp_path / "cider")]) == 0
    _, records = read_results(tmp_path / "cider" / "results.json")
    assert {r["detector"] for r in records} == {"msp", "knn"}
    state = torch.load(tmp_path / "cider" / "finetuned.pth", weights_only=True)
    assert state.keys() == torch.load(weights, weights_only=True).keys()
    capsys.readouterr()
    # the tiny bench has 3 training images of class 1: PALM's 6 prototypes per class cannot be placed
    assert main(args + ["--method", "palm", "--out", str(tmp_path / "palm")]) == 2
    assert "6 prototypes per class but classes" in capsys.readouterr().err


# -- SAL -------------------------------------------------------------------------------------------------------
from oodscope.training.objectives.sal import (filter_candidates, filtering_scores, last_layer_gradients,  # noqa: E402
                                              wild_mixture)


def test_sal_last_layer_gradients_equal_autograd_with_predicted_and_given_labels():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(5, 4)))
    layer = nn.Linear(4, 3).double()
    logits = layer(features)
    given = np.array([2, 0, 1, 1, 0])
    for labels in (None, given):
        expected = []
        for i in range(5):
            layer.zero_grad()
            target = logits[i].argmax() if labels is None else torch.tensor(labels[i])
            nn.functional.cross_entropy(layer(features[i:i + 1]), target.view(1)).backward()
            expected.append(layer.weight.grad.flatten().numpy().copy())
        ours = last_layer_gradients(logits.detach().numpy(), features.numpy(), labels)
        assert np.allclose(ours, np.stack(expected), atol=1e-12)


def test_sal_filter_recovers_planted_outliers_from_a_low_rank_gradient_set():
    # ID gradients: isotropic noise around a mean; the planted outliers add a large multiple of one direction u
    rng = np.random.default_rng(0)
    dim, n_id, n_out = 40, 900, 100
    mean = rng.normal(size=dim)
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)
    id_labelled = mean + 0.1 * rng.normal(size=(2000, dim))
    wild = mean + 0.1 * rng.normal(size=(n_id + n_out, dim))
    wild[n_id:] += rng.uniform(1.0, 2.0, (n_out, 1)) * u
    candidates, threshold, scores = filter_candidates(wild, id_labelled, thres_id=0.95)
    assert candidates[n_id:].all()  # every planted outlier is caught
    assert candidates[:n_id].mean() < 0.08  # and about 5 % of ID (the 95 % ID quantile) as false candidates
    # the score is the squared projection on the top singular vector of the centred wild gradients = u
    tau, v = filtering_scores(wild, id_labelled.mean(axis=0))
    assert abs(abs(v @ u) - 1) < 1e-3 and np.allclose(tau, scores)
    assert np.allclose(tau, ((wild - id_labelled.mean(axis=0)) @ v) ** 2)
    # by hand on two rows: G = [[3, 0], [0, 1]] (reference 0): v = e_1, tau = (9, 0)
    tau, v = filtering_scores(np.array([[3.0, 0.0], [0.0, 1.0]]), np.zeros(2))
    assert np.allclose(np.abs(v), [1, 0]) and np.allclose(tau, [9, 0])


def test_sal_wild_mixture_has_the_stated_share_of_outliers_and_refuses_bad_input():
    ids = np.zeros((90, 2, 2, 3), np.uint8)
    outs = np.full((50, 2, 2, 3), 255, np.uint8)
    wild, is_outlier = wild_mixture(ids, outs, 0.1, seed=0)
    assert len(wild) == 100 and is_outlier.sum() == 10 and (wild[is_outlier] == 255).all()
    assert (wild[~is_outlier] == 0).all() and not (is_outlier[:10].all())  # shuffled
    for pi in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"pi .* must lie in \(0, 1\)"):
            wild_mixture(ids, outs, pi)
    with pytest.raises(ValueError, match="needs auxiliary outliers"):
        wild_mixture(ids, outs[:0], 0.1)
    with pytest.raises(ValueError, match="leaves no outlier"):
        wild_mixture(ids[:3], outs, 0.1)
    with pytest.raises(ValueError, match="needs 60 outliers, only 50"):
        wild_mixture(ids, outs, 0.4)


def test_sal_fine_tunes_on_filtered_candidates_and_scores_with_its_outlier_unit():
    x, y, outliers = _toy()
    base, _ = finetune(_mlp(), (x, y), "cross_entropy", **TOY)
    objective = oodscope.create("sal")
    tuned, history = finetune(base, (x, y), objective, outliers=outliers, **TOY)
    f = objective.filter_
    assert f["wild"] == 400 + 44 and f["planted"] == 44 and 0 < f["candidates"] < f["wild"]
    assert f["precision"] > 0.1  # candidates are richer in outliers than the wild data (pi = 0.1)
    assert history.epochs[-1]["binary"] < history.epochs[0]["binary"]
    assert {"3.outlier.weight", "3.classes.weight"} <= set(tuned.state_dict())  # the binary unit next to the classes
    s_in, s_out = _own_scores_of(objective, tuned, x, y, _toy(seed=1)[2])
    assert 0 <= s_in.min() and s_out.max() <= 1 and np.median(s_out) > np.median(s_in)


def _own_scores_of(objective, model, x, y, test_out):
    detector = objective.score_detector()
    options = dict(use_cache=False, progress=False, layers=detector.layer_names())
    detector.fit(oodscope.extract(model, (x, y), **options))
    return (detector.score(oodscope.extract(model, x, **options)),
            detector.score(oodscope.extract(model, test_out, **options)))


def test_sal_bad_settings_and_missing_outliers_are_refused():
    x, y, outliers = _toy()
    for params, message in ((dict(pi=0.0), r"pi .* must lie in \(0, 1\)"), (dict(pi=1.0), r"pi .* \(0, 1\)"),
                            (dict(thres_id=1.0), r"thres_id .* \(0, 1\)"), (dict(beta=0), "beta must be")):
        with pytest.raises(ValueError, match=message):
            finetune(_mlp(), (x, y), oodscope.create("sal", **params), outliers=outliers, **TOY)
    with pytest.raises(ValueError, match="needs auxiliary outliers"):
        finetune(_mlp(), (x, y), "sal", **TOY)
    with pytest.raises(ValueError, match="are ID training images"):  # wild data without outliers
        finetune(_mlp(), (x, y), "sal", outliers=x.copy(), **TOY)
