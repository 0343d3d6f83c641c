import warnings

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.data.transforms import ImageNormalize


class TinyNet(nn.Module):
    cache_ignore = ("calls",)  # a call counter never changes the outputs

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.pool(self.body(x)).flatten(1))


@pytest.fixture
def images(rng):
    return rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8), rng.integers(0, 3, 50)


PRE = ImageNormalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def test_extract_returns_logits_features_layers_and_head(images, tmp_path):
    x, y = images
    model = TinyNet()
    out = oodscope.extract(model, (x, y), name="tiny", preprocess=PRE, layers=["body.0"], batch_size=16,
                           cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        inputs = PRE(torch.as_tensor(x))
        features = model.pool(model.body(inputs)).flatten(1).numpy()
        conv = model.body[0](inputs).mean(dim=(2, 3)).numpy()
        logits = model(inputs).numpy()
    assert out.logits == pytest.approx(logits, abs=1e-5)
    assert out.features == pytest.approx(features, abs=1e-5)
    assert out.layers["body.0"] == pytest.approx(conv, abs=1e-5)
    assert out.head.W == pytest.approx(model.fc.weight.detach().numpy())
    assert out.features @ out.head.W.T + out.head.b == pytest.approx(out.logits, abs=1e-5)
    assert (out.labels == y).all() and out.labels.dtype == np.int64
    with pytest.raises(ValueError, match="no layers"):
        oodscope.extract(model, x, preprocess=PRE, layers=["nope"], cache_dir=tmp_path, progress=False)


def test_second_extract_reads_cache_and_never_calls_model(images, tmp_path):
    x, y = images
    model = TinyNet()
    first = oodscope.extract(model, (x, y), name="a", preprocess=PRE, cache_dir=tmp_path, progress=False)
    calls = model.calls
    second = oodscope.extract(model, (x, y), name="a", preprocess=PRE, cache_dir=tmp_path, progress=False)
    assert model.calls == calls
    assert np.array_equal(first.logits, second.logits) and np.array_equal(first.features, second.features)
    assert second.source is not None and second.source.model is model
    # another preprocessing, other data or other weights are other keys
    oodscope.extract(model, (x[:-1], y[:-1]), name="a", preprocess=PRE, cache_dir=tmp_path, progress=False)
    assert model.calls > calls


def test_evaluate_twice_extracts_once(images, tmp_path):
    x, y = images
    model = TinyNet()
    ood = {"near": {"noise": np.full((20, 6, 6, 3), 128, np.uint8)}}
    kwargs = dict(train=(x, y), model=model, preprocess=PRE, cache_dir=tmp_path, progress=False)
    first = oodscope.evaluate(["msp", "mahalanobis"], (x, y), ood, **kwargs)
    calls = model.calls
    assert calls > 0
    second = oodscope.evaluate(["msp", "mahalanobis"], (x, y), ood, **kwargs)
    assert model.calls == calls
    assert first.table() == second.table()


def test_corrupted_or_foreign_cache_is_detected_and_recomputed(images, tmp_path):
    x, y = images
    model = TinyNet()
    reference = oodscope.extract(model, (x, y), name="c", preprocess=PRE, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("c-*.npz")
    path.write_bytes(path.read_bytes()[:-200])  # truncated on disk
    calls = model.calls
    with pytest.warns(UserWarning, match="unusable"):
        again = oodscope.extract(model, (x, y), name="c", preprocess=PRE, cache_dir=tmp_path, progress=False)
    assert model.calls > calls and np.allclose(again.logits, reference.logits)
    # an entry written for another model, copied under this key's file name
    other = TinyNet(seed=1)
    oodscope.extract(other, (x, y), name="o", preprocess=PRE, cache_dir=tmp_path, progress=False)
    (other_path,) = tmp_path.glob("o-*.npz")
    path.write_bytes(other_path.read_bytes())
    calls = model.calls
    with pytest.warns(UserWarning, match="another model"):
        again = oodscope.extract(model, (x, y), name="c", preprocess=PRE, cache_dir=tmp_path, progress=False)
    assert model.calls > calls and np.allclose(again.logits, reference.logits)
    # a flipped byte inside an array fails its checksum (or the zip CRC)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unusable"):
        oodscope.extract(model, (x, y), name="c", preprocess=PRE, cache_dir=tmp_path, progress=False)


def test_unstable_preprocessing_is_not_cached(images, tmp_path):
    x, _ = images
    with pytest.warns(UserWarning, match="not cached"):
        oodscope.extract(TinyNet(), x, preprocess=lambda t: t.permute(0, 3, 1, 2).float(), cache_dir=tmp_path,
                         progress=False)
    assert not list(tmp_path.glob("*.npz"))


def test_dataset_input_and_auto_device(tmp_path, images):
    x, y = images
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    out = oodscope.extract(TinyNet(), dataset, preprocess=PRE, cache_dir=tmp_path, progress=False, device="auto")
    assert out.logits.shape == (50, 3) and (out.labels == y).all()
    assert oodscope.extraction.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="empty"):
        oodscope.extract(TinyNet(), x[:0], preprocess=PRE, cache_dir=tmp_path, progress=False)


def test_evaluate_refuses_id_test_as_ood(make_outputs):
    train, test = make_outputs(), make_outputs(name="test")
    with pytest.raises(ValueError, match="identical to the ID test set"):
        oodscope.evaluate(["msp"], test, {"x": test.subset(slice(None), name="copy")}, train=train)
    with pytest.raises(ValueError, match="only OOD labels"):
        ood_as_id = make_outputs(name="ood")
        ood_as_id.labels[:] = -1
        oodscope.evaluate(["msp"], ood_as_id, {"x": test}, train=train)


def test_evaluate_refuses_two_sets_under_one_name(make_outputs):
    """Scores are kept per set name: a second set of the same name in another group (or the ID test set's name)
    would silently get the first's numbers, so it is refused."""
    train, test = make_outputs(), make_outputs(name="test")
    a, b = make_outputs(name="a", shift=1.0), make_outputs(name="b", shift=2.0)
    with pytest.raises(ValueError, match="'noise' .*group 'far'.* already used by group 'near'"):
        oodscope.evaluate(["msp"], test, {"near": {"noise": a}, "far": {"noise": b}}, train=train)
    with pytest.raises(ValueError, match="already used by the ID test set"):
        oodscope.evaluate(["msp"], test, {"near": {"test": a}}, train=train)
    results = oodscope.evaluate(["msp"], test, {"near": {"noise": a}, "far": {"noise2": b}}, train=train)
    assert results.records[0]["auroc"] != results.records[1]["auroc"]


def test_evaluate_table_has_group_means(make_outputs):
    train, test = make_outputs(), make_outputs(name="test")
    ood = {"near": {"a": make_outputs(name="a", shift=0.5), "b": make_outputs(name="b", shift=1.0)},
           "far": {"c": make_outputs(name="c", shift=3.0)}}
    results = oodscope.evaluate(["knn", "mahalanobis"], test, ood, train=train)
    table = results.table()
    assert all(set(r) == {"detector", "dataset", "group", "auroc", "fpr95", "aupr_in", "aupr_out"} for r in table)
    near = [r for r in table if r["detector"] == "knn" and r["group"] == "near"]
    mean = next(r for r in near if r["dataset"] == "mean")
    assert mean["auroc"] == pytest.approx(np.mean([r["auroc"] for r in near if r["dataset"] != "mean"]))
    assert results.id_accuracy is not None and 0 <= results.id_accuracy <= 100
    warnings.simplefilter("error")  # leaderboard renders without warnings
    assert "knn" in results.leaderboard()


def test_rerun_matches_extraction_and_perturb_moves_inputs(images, tmp_path):
    from oodscope.extraction.rerun import perturb, rerun

    x, y = images
    model = TinyNet()
    out = oodscope.extract(model, (x, y), preprocess=PRE, cache_dir=tmp_path, progress=False, batch_size=16)
    again = rerun(out.source, lambda batch, probe: probe(batch)["features"])
    assert again == pytest.approx(out.features, abs=1e-5)
    with pytest.raises(ValueError, match="runs the network again"):
        oodscope.Outputs(logits=out.logits, name="cached").get("model", who="odin")
    # one signed-gradient step of size eps raises the max logit
    batch = PRE(torch.as_tensor(x[:8]))
    stepped = perturb(batch, lambda z: model(z).max(dim=1).values, epsilon=0.01)
    assert torch.allclose((stepped - batch).abs().max(), torch.tensor(0.01), atol=1e-6)
    with torch.no_grad():
        assert (model(stepped).max(1).values > model(batch).max(1).values).float().mean() > 0.9


def test_interrupted_write_leaves_no_entry_and_finished_entries_survive(images, tmp_path, monkeypatch):
    from oodscope.extraction import cache

    x, y = images
    model = TinyNet()
    oodscope.extract(model, (x, y), name="done", preprocess=PRE, cache_dir=tmp_path, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        oodscope.extract(model, (x[:10], y[:10]), name="cut", preprocess=PRE, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["done"]  # no partial or temporary file
    calls = model.calls
    oodscope.extract(model, (x, y), name="done", preprocess=PRE, cache_dir=tmp_path, progress=False)
    assert model.calls == calls


def test_inputs_of_the_wrong_shape_get_a_message_naming_the_input(images):
    x, y = images
    model = TinyNet()
    with pytest.raises(ValueError, match=r"inputs have shape \(50,\): expected a batch"):
        oodscope.extract(model, x[:, 0, 0, 0], use_cache=False, progress=False)
    four = np.concatenate([x, x[..., :1]], axis=3)  # 4 channels for a 3-channel network
    with pytest.raises(ValueError, match=r"dataset 'data': the model cannot run on a batch of shape \(16, 6, 6, 4\)"):
        oodscope.extract(model, four, preprocess=PRE, batch_size=16, use_cache=False, progress=False)


# -- loaders and batches: DataLoader, Dataset, dict batches, (x, y, ...) tuples --------------------------------
def _keyword_model():
    class TokenBag(torch.nn.Module):
        """Mean of token embeddings under the attention mask, then a linear head (keyword inputs)."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask[..., None].float()
            return self.fc((self.embed(input_ids) * mask).sum(1) / mask.sum(1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TokenBag().eval()


def _tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (70, 5))
    mask = np.ones((70, 5), np.int64)
    mask[::3, 3:] = 0
    return ids, mask, np.arange(70) % 3


class _CountingDataset(torch.utils.data.Dataset):
    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels, self.reads = ids, mask, labels, 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        self.reads += 1
        return {"input_ids": torch.as_tensor(self.ids[i]), "attention_mask": torch.as_tensor(self.mask[i]),
                "labels": int(self.labels[i])}


def test_extract_on_a_dataloader_of_dict_batches_equals_the_arrays_and_reads_each_item_once(tmp_path):
    model = _keyword_model()
    ids, mask, labels = _tokens()
    reference = oodscope.extract(model, {"input_ids": ids, "attention_mask": mask}, labels, use_cache=False,
                                 progress=False)
    dataset = _CountingDataset(ids, mask, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    out = oodscope.extract(model, loader, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(out.logits, reference.logits)
    np.testing.assert_array_equal(out.features, reference.features)
    np.testing.assert_array_equal(out.labels, labels)
    assert dataset.reads == 70
    dataset.reads = 0
    again = oodscope.extract(model, dataset, cache_dir=tmp_path, progress=False)  # a cache hit
    np.testing.assert_array_equal(again.logits, reference.logits)
    assert dataset.reads == 70  # read once to key the cache, not once more per pass


def test_extract_takes_x_y_index_tuples_and_refuses_a_shuffled_loader_silently():
    x = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    y = np.arange(40) % 3
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reference = oodscope.extract(model, (x, y), use_cache=False, progress=False)
    batches = [(torch.from_numpy(x[i:i + 8]), torch.from_numpy(y[i:i + 8]), torch.arange(i, i + 8))
               for i in range(0, 40, 8)]
    out = oodscope.extract(model, batches, use_cache=False, progress=False)
    np.testing.assert_allclose(out.logits, reference.logits, rtol=1e-6)
    np.testing.assert_array_equal(out.labels, y)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x)), batch_size=8,
                                           shuffle=True)
    with pytest.warns(UserWarning, match="shuffles"):
        oodscope.extract(model, shuffled, use_cache=False, progress=False)
    with pytest.raises(ValueError, match="empty"):
        oodscope.extract(model, [], use_cache=False, progress=False)
    with pytest.raises(ValueError, match="same length"):
        oodscope.extract(_keyword_model(), {"input_ids": np.zeros((3, 5), np.int64),
                                            "attention_mask": np.ones((2, 5))}, use_cache=False, progress=False)


def test_extract_leaves_the_callers_model_where_it_was(monkeypatch):
    """The model is moved to the extraction device and back (recorded: this machine has one device)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    moves = []
    original_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(a) or original_to(self, *a, **k))
    oodscope.extract(model, np.zeros((4, 6), np.float32), use_cache=False, progress=False)
    assert moves[-1] == (torch.device("cpu"),) and len(moves) >= 2  # to the device, then back home


@pytest.mark.parametrize("train_mode", [True, False])
def test_extract_runs_in_eval_mode_and_gives_every_submodule_its_own_mode_back(train_mode):
    """A batch norm frozen in eval mode inside a model in training mode stays frozen, a model in eval mode stays in
    eval mode (a blanket ``model.train(was_training)`` would flip both); the forward pass saw eval mode."""
    frozen, dropout = nn.BatchNorm1d(6), nn.Dropout(0.5)
    model = nn.Sequential(frozen, nn.Linear(6, 3), dropout).train(train_mode)
    frozen.eval()
    seen = []
    dropout.register_forward_hook(lambda module, *_: seen.append(module.training))
    out = oodscope.extract(model, np.ones((4, 6), np.float32), use_cache=False, progress=False)
    assert seen == [False] and np.isfinite(out.logits).all()
    assert [m.training for m in model.modules()] == [train_mode, False, train_mode, train_mode]
    assert frozen.running_mean.abs().max() == 0  # eval mode: the statistics were not updated
