"""CAOOD / meta OOD learning (oodscope.training.meta_ood): the inner step and the meta-gradients by hand, the task
construction, adaptation on a planted problem, seeding and resume, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from oodscope.data.corruptions import corrupt
from oodscope.metrics import auroc
from oodscope.training import meta_ood
from oodscope.training.meta_ood import (CHECKPOINT, CLEAN, Batch, Shift, ShiftTask, adapt, adaptation_curve,
                                        build_tasks, caood_loss, clean_margins, clip_gradients, draw_sets,
                                        energy_score, inner_update, logits_of, meta_gradient, meta_train, msp_score,
                                        shift_grid, split_cifar_resnet, support_set)

MARGINS = (-2.0, -0.5, 0.3)


def _linear(weight, bias, dtype=torch.float64) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=dtype))
    return layer


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _hand_gradient(w: np.ndarray, b: np.ndarray, x_in, y, x_out, margins=MARGINS) -> tuple[np.ndarray, np.ndarray]:
    """d/d(W, b) of CE + lam (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2) for logits W x + b."""
    m_in, m_out, lam = margins
    z_in, z_out = x_in @ w.T + b, x_out @ w.T + b
    p_in, p_out = _softmax(z_in), _softmax(z_out)
    e_in = -np.log(np.exp(z_in).sum(axis=1))
    e_out = -np.log(np.exp(z_out).sum(axis=1))
    onehot = np.eye(w.shape[0])[y]
    dz_in = (p_in - onehot) / len(x_in) + lam * 2 * np.maximum(e_in - m_in, 0)[:, None] * -p_in / len(x_in)
    dz_out = lam * 2 * np.maximum(m_out - e_out, 0)[:, None] * p_out / len(x_out)
    return dz_in.T @ x_in + dz_out.T @ x_out, dz_in.sum(axis=0) + dz_out.sum(axis=0)


def _tiny_sets(seed: int = 0):
    rng = np.random.default_rng(seed)
    x_in, x_out = rng.normal(size=(3, 2)), rng.normal(size=(2, 2)) * 2
    return x_in, np.array([0, 1, 1]), x_out


def _batch(x_in, y, x_out) -> Batch:
    return Batch(torch.as_tensor(x_in), torch.as_tensor(y), torch.as_tensor(x_out))


W0, B0 = np.array([[0.5, -0.3], [0.2, 0.8]]), np.array([0.1, -0.2])


def test_loss_matches_a_hand_computation():
    x_in, y, x_out = _tiny_sets()
    z_in, z_out = x_in @ W0.T + B0, x_out @ W0.T + B0
    e_in, e_out = -np.log(np.exp(z_in).sum(1)), -np.log(np.exp(z_out).sum(1))
    ce = -np.log(_softmax(z_in)[np.arange(3), y]).mean()
    expected = ce + 0.3 * (np.maximum(e_in + 2.0, 0) ** 2).mean() + 0.3 * (np.maximum(-0.5 - e_out, 0) ** 2).mean()
    got = caood_loss(torch.as_tensor(z_in), torch.as_tensor(y), torch.as_tensor(z_out), *MARGINS)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_inner_step_is_theta_minus_alpha_gradient_by_hand():
    x_in, y, x_out = _tiny_sets()
    part = _linear(W0, B0)
    path = adapt(part, _batch(x_in, y, x_out), steps=2, lr=0.1, margins=MARGINS)
    gw, gb = _hand_gradient(W0, B0, x_in, y, x_out)
    w1, b1 = W0 - 0.1 * gw, B0 - 0.1 * gb
    assert np.allclose(path[1]["weight"].detach().numpy(), w1, atol=1e-12)
    assert np.allclose(path[1]["bias"].detach().numpy(), b1, atol=1e-12)
    gw, gb = _hand_gradient(w1, b1, x_in, y, x_out)
    assert np.allclose(path[2]["weight"].detach().numpy(), w1 - 0.1 * gw, atol=1e-12)
    assert np.allclose(path[0]["weight"].detach().numpy(), W0)          # step 0 = the initialisation
    assert np.allclose(part.weight.detach().numpy(), W0)                # the part is left alone
    update = inner_update({"a": torch.tensor([1.0, 2.0])}, [torch.tensor([0.5, -1.0])], 0.2)
    assert torch.allclose(update["a"], torch.tensor([0.9, 2.2]))


def test_clipped_step_has_the_clip_norm():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    clipped = clip_gradients(grads, 1.0)
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.0])) and torch.allclose(clipped[1], torch.tensor([[0.8]]))
    assert torch.allclose(clip_gradients(grads, 10.0)[0], grads[0])     # below the norm: unchanged
    assert clip_gradients(grads, None)[1] is grads[1]


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_weights():
    support, query = _tiny_sets(0), _tiny_sets(1)
    part = _linear(W0, B0)
    grads, loss = meta_gradient(part, dict(part.named_parameters()), _batch(*support), _batch(*query), steps=1,
                                lr=0.2, margins=MARGINS, first_order=True)
    gw, gb = _hand_gradient(W0, B0, *support)
    w1, b1 = W0 - 0.2 * gw, B0 - 0.2 * gb
    qw, qb = _hand_gradient(w1, b1, *query)
    assert np.allclose(grads[0].numpy(), qw, atol=1e-12) and np.allclose(grads[1].numpy(), qb, atol=1e-12)
    assert part.weight.grad is None                                     # nothing accumulated on the part


def test_second_order_meta_gradient_matches_finite_differences():
    support, query = _tiny_sets(0), _tiny_sets(1)
    part = _linear(W0, B0)
    grads, _ = meta_gradient(part, dict(part.named_parameters()), _batch(*support), _batch(*query), steps=2,
                             lr=0.2, margins=MARGINS, first_order=False)

    def outer(w, b) -> float:
        fast = adapt(part, _batch(*support), 2, 0.2, {"weight": torch.as_tensor(w).requires_grad_(),
                                                      "bias": torch.as_tensor(b).requires_grad_()}, MARGINS)[-1]
        return float(meta_ood.set_loss(part, fast, _batch(*query), MARGINS).detach())

    eps, numeric = 1e-6, np.zeros_like(W0)
    for i in range(2):
        for j in range(2):
            step = np.zeros_like(W0)
            step[i, j] = eps
            numeric[i, j] = (outer(W0 + step, B0) - outer(W0 - step, B0)) / (2 * eps)
    assert np.allclose(grads[0].numpy(), numeric, atol=1e-6)
    first, _ = meta_gradient(part, dict(part.named_parameters()), _batch(*support), _batch(*query), steps=2,
                             lr=0.2, margins=MARGINS, first_order=True)
    assert not np.allclose(first[0].numpy(), numeric, atol=1e-4)       # first order drops the Hessian term


# -- tasks ----------------------------------------------------------------------------------------------------------
def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _encode(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def test_shift_grid_and_task_construction():
    shifts = shift_grid(["gaussian_noise", "contrast"], [1, 5], clean=True)
    assert [s.name for s in shifts] == [CLEAN, "gaussian_noise@1", "gaussian_noise@5", "contrast@1", "contrast@5"]
    images, labels, outliers = _images(20), np.arange(20) % 4, _images(15, seed=1)
    tasks = build_tasks(_encode, images, labels, outliers, shifts, n_id=6, n_ood=5, seed=3)
    again = build_tasks(_encode, images, labels, outliers, shifts, n_id=6, n_ood=5, seed=3)
    other = build_tasks(_encode, images, labels, outliers, shifts, n_id=6, n_ood=5, seed=4)
    for i, (task, same) in enumerate(zip(tasks, again)):
        assert task.shift == shifts[i] and task.id_features.shape == (6, 192) and task.ood_features.shape == (5, 192)
        assert np.array_equal(task.id_features, same.id_features) and np.array_equal(task.id_labels, same.id_labels)
        rows = np.sort(np.random.default_rng(3 + i).choice(20, 6, replace=False))
        assert np.array_equal(task.id_labels, labels[rows])              # labels follow their images
        expected = images[rows] if task.shift.family == CLEAN else corrupt(images[rows], task.shift.family,
                                                                           task.shift.severity, 3 + i)
        assert np.array_equal(task.id_features, _encode(expected))
    assert not np.array_equal(tasks[2].id_features, other[2].id_features)
    assert not np.array_equal(tasks[0].id_features, tasks[1].id_features)  # the shift changes the images


def _rotated_task(quarter: bool, n: int, seed: int) -> ShiftTask:
    """Two ID classes at +-3 along e1 with outliers at +-3 along e2; ``quarter`` turns the plane by 90 degrees."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x_in = np.stack([np.where(y == 0, 3.0, -3.0), np.zeros(n)], axis=1) + 0.3 * rng.normal(size=(n, 2))
    x_out = np.stack([np.zeros(n), rng.choice([-3.0, 3.0], n)], axis=1) + 0.3 * rng.normal(size=(n, 2))
    if quarter:
        x_in, x_out = x_in[:, ::-1].copy(), x_out[:, ::-1].copy()
    return ShiftTask(Shift(CLEAN, 0) if not quarter else Shift("contrast", 3), x_in.astype(np.float32),
                     y.astype(np.int64), x_out.astype(np.float32))


def test_adaptation_on_a_planted_shift_improves_auroc_where_the_fixed_detector_fails():
    part = _linear(np.array([[1.5, 0.0], [-1.5, 0.0]]), np.zeros(2), torch.float32)  # fits the unturned task
    plain, turned = _rotated_task(False, 200, 0), _rotated_task(True, 200, 1)
    evaluation = {"id": turned.id_features[16:], "ood": turned.ood_features[16:]}
    curve = adaptation_curve(part, support_set(turned, 16, seed=0), evaluation, steps=30, lr=0.5,
                             margins=(-4.0, -1.5, 0.1), clip=None)

    def detector_auroc(entry) -> float:
        return auroc(energy_score(entry["id"]), energy_score(entry["ood"]))

    fixed = logits_of(part, dict(part.named_parameters()), plain.id_features), \
        logits_of(part, dict(part.named_parameters()), plain.ood_features)
    assert auroc(energy_score(fixed[0]), energy_score(fixed[1])) > 0.99    # right on the distribution it fits
    assert detector_auroc(curve[0]) < 0.1                                 # the turn fools the fixed detector
    assert detector_auroc(curve[-1]) > 0.95                               # 16 shots and 30 steps repair it
    accuracy = (curve[-1]["id"].argmax(axis=1) == turned.id_labels[16:]).mean()
    assert accuracy > 0.95


def test_each_init_wins_its_own_objective_on_planted_tasks():
    """Tasks: the plane turned by one of four angles (so the labels' direction differs per task). On fresh draws,
    the meta-learned init has the lower query loss *after* one inner step (the MAML objective), the jointly trained
    control the lower loss *before* any step (its own objective)."""
    def turned(angle: float, seed: int) -> ShiftTask:
        task = _rotated_task(False, 96, seed)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
        return ShiftTask(Shift("contrast", 1), task.id_features @ rot.T, task.id_labels, task.ood_features @ rot.T)

    angles = np.deg2rad([0, 90, 180, 270])
    margins = (-4.0, -1.5, 0.1)
    options = dict(epochs=1, steps_per_epoch=80, meta_batch=4, shots=8, query=24, inner_steps=1, inner_lr=0.3,
                   clip=None, outer_lr=0.05, m_in=margins[0], m_out=margins[1], lam=margins[2], progress=False)
    init = _linear(np.array([[0.3, -0.2], [0.1, 0.4]]), np.zeros(2), torch.float32)
    trained = {meta: meta_train(init, [turned(a, i) for i, a in enumerate(angles)], meta=meta, **options)[0]
               for meta in (True, False)}
    losses = {}
    for meta, part in trained.items():
        before, after = [], []
        for i, angle in enumerate(angles):
            support, query = draw_sets(turned(angle, 50 + i), [8, 24], torch.Generator().manual_seed(i))
            path = adapt(part, support, 1, 0.3, margins=margins)
            before.append(float(meta_ood.set_loss(part, path[0], query, margins).detach()))
            after.append(float(meta_ood.set_loss(part, path[1], query, margins).detach()))
        losses[meta] = (np.mean(before), np.mean(after))
    assert losses[True][1] < losses[False][1]                            # meta: better after one step
    assert losses[False][0] < losses[True][0]                            # control: better without adaptation
    assert losses[True][1] < losses[True][0]                             # the step helps the meta-learned init


# -- training: seeds, resume ----------------------------------------------------------------------------------------
FAST = dict(epochs=3, steps_per_epoch=2, meta_batch=2, shots=4, query=4, inner_steps=2, inner_lr=0.1,
            outer_lr=0.01, m_in=-4.0, m_out=-1.5, progress=False)


def _planted_tasks() -> list[ShiftTask]:
    return [_rotated_task(False, 20, 0), _rotated_task(True, 20, 1)]


def _state(part) -> dict:
    return {k: v.detach().clone() for k, v in part.state_dict().items()}


def test_meta_train_is_seeded_and_leaves_the_part_alone():
    init = _linear(np.ones((2, 2)) * 0.1, np.zeros(2), torch.float32)
    before = _state(init)
    one, history = meta_train(init, _planted_tasks(), seed=1, **FAST)
    two, _ = meta_train(init, _planted_tasks(), seed=1, **FAST)
    three, _ = meta_train(init, _planted_tasks(), seed=2, **FAST)
    assert all(torch.equal(a, b) for a, b in zip(_state(one).values(), _state(two).values()))
    assert not torch.equal(_state(one)["weight"], _state(three)["weight"])
    assert all(torch.equal(a, b) for a, b in zip(_state(init).values(), before.values()))
    assert len(history.epochs) == 3 and all(np.isfinite(e["loss"]) for e in history.epochs)


@pytest.mark.parametrize("meta", [True, False])
def test_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch, meta):
    init = _linear(np.ones((2, 2)) * 0.1, np.zeros(2), torch.float32)
    full, _ = meta_train(init, _planted_tasks(), meta=meta, **FAST)
    original, calls = meta_ood.task_gradient, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 2:                                       # dies during the third epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(meta_ood, "task_gradient", flaky)
    with pytest.raises(KeyboardInterrupt):
        meta_train(init, _planted_tasks(), meta=meta, checkpoint_dir=tmp_path, **FAST)
    assert (tmp_path / CHECKPOINT).exists()
    monkeypatch.setattr(meta_ood, "task_gradient", original)
    resumed, history = meta_train(init, _planted_tasks(), meta=meta, checkpoint_dir=tmp_path, **FAST)
    assert all(torch.equal(a, b) for a, b in zip(_state(full).values(), _state(resumed).values()))
    assert len(history.epochs) == 3
    with pytest.raises(ValueError, match="checkpoint"):
        meta_train(init, _planted_tasks(), meta=meta, checkpoint_dir=tmp_path, **{**FAST, "inner_lr": 0.2})


def test_non_finite_loss_stops_training():
    with pytest.raises(FloatingPointError, match="loss"):
        meta_train(_linear(np.ones((2, 2)) * 1e30, np.zeros(2), torch.float32), _planted_tasks(),
                   **{**FAST, "inner_steps": 0})


# -- the CIFAR ResNet split and the scores --------------------------------------------------------------------------
def test_split_cifar_resnet_reproduces_the_network():
    from oodscope.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(2).eval()
    images = _images(5).repeat(4, axis=1).repeat(4, axis=2)              # 32 x 32
    encode, part = split_cifar_resnet(model, blocks=1)
    features = encode(images)
    assert features.shape == (5, 64, 8, 8)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).double().numpy()
    got = logits_of(part, dict(part.named_parameters()), features)
    assert np.allclose(got, expected, atol=1e-4)
    assert part[0] is not model.layer3[1]                               # a copy: adapting it leaves the model alone
    with pytest.raises(ValueError, match="blocks"):
        split_cifar_resnet(model, blocks=3)


def test_scores_and_margins():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    lse = np.log(np.exp(logits).sum(axis=1))
    assert np.allclose(energy_score(logits), -lse)
    assert np.allclose(msp_score(logits), -_softmax(logits).max(axis=1))
    part = _linear(np.array([[1.5, 0.0], [-1.5, 0.0]]), np.zeros(2), torch.float32)
    m_in, m_out = clean_margins(part, _rotated_task(False, 40, 0))
    params = dict(part.named_parameters())
    assert m_in == pytest.approx(np.median(energy_score(logits_of(part, params, _rotated_task(False, 40, 0)
                                                                  .id_features))))
    assert m_in < m_out


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_error():
    images, labels, outliers = _images(10), np.arange(10) % 2, _images(6, seed=1)
    with pytest.raises(ValueError, match="unknown corruption family 'fog'"):
        Shift("fog", 3)
    for severity in (0, 6, True):
        with pytest.raises(ValueError, match="severity must be 1-5"):
            Shift("jpeg", severity)
    with pytest.raises(ValueError, match="clean distribution has severity 0"):
        Shift(CLEAN, 2)
    with pytest.raises(ValueError, match="at least one"):
        shift_grid([], [1])
    for bad_outliers in (None, outliers[:0]):
        with pytest.raises(ValueError, match="outliers"):
            build_tasks(_encode, images, labels, bad_outliers, [Shift("jpeg", 1)], 4, 4)
    with pytest.raises(ValueError, match="n_ood = 7 samples per task, but 6 are available"):
        build_tasks(_encode, images, labels, outliers, [Shift("jpeg", 1)], 4, 7)
    nan_images = images.astype(np.float32)
    nan_images[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_tasks(_encode, nan_images, labels, outliers, [Shift("jpeg", 1)], 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        ShiftTask(Shift(CLEAN, 0), np.full((3, 2), np.nan, np.float32), np.zeros(3, np.int64),
                  np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="no OOD samples"):
        ShiftTask(Shift(CLEAN, 0), np.zeros((3, 2), np.float32), np.zeros(3, np.int64), np.zeros((0, 2), np.float32))
    task = _rotated_task(False, 10, 0)
    with pytest.raises(ValueError, match="k need 11 ID samples of clean, only 10 are available"):
        support_set(task, 11)
    with pytest.raises(ValueError, match="shots \\+ query need 12"):
        meta_train(_linear(np.zeros((2, 2)), np.zeros(2), torch.float32), [task], **{**FAST, "shots": 6, "query": 6})
    with pytest.raises(ValueError, match="no meta-training tasks"):
        meta_train(_linear(np.zeros((2, 2)), np.zeros(2), torch.float32), [], **FAST)
    with pytest.raises(ValueError, match="inner_lr"):
        meta_train(_linear(np.zeros((2, 2)), np.zeros(2), torch.float32), [task], **{**FAST, "inner_lr": -1.0})
    with pytest.raises(ValueError, match="m_in must be below m_out"):
        meta_train(_linear(np.zeros((2, 2)), np.zeros(2), torch.float32), [task], **{**FAST, "m_in": 0.0})
    part = _linear(np.zeros((2, 2)), np.zeros(2), torch.float32)
    with pytest.raises(ValueError, match="NaN"):
        logits_of(part, dict(part.named_parameters()), np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="steps"):
        adaptation_curve(part, support_set(task, 2), {"id": task.id_features}, -1, 0.1)
    generator = torch.Generator().manual_seed(0)
    support, query = draw_sets(task, [3, 4], generator)
    assert len(support.x_in) == 3 and len(query.x_out) == 4             # disjoint draws of one permutation
    assert not set(map(tuple, support.x_in.numpy().round(6))) & set(map(tuple, query.x_in.numpy().round(6)))
