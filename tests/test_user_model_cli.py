"""``oodscope fit`` / ``oodscope score`` on a user's own model and data, model specs, data files, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import oodscope
from oodscope.cli import main

DETECTORS = ["msp", "energy", "knn_distance", "mahalanobis", "vim"]


class FeatureNet(torch.nn.Module):
    """A conv net returning ``(logits, features)``, the way a TorchScript model hands over its features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(features), features


def plain_net() -> torch.nn.Module:
    """``package.module:callable`` target: an MLP on 4 tabular features (3 classes)."""
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _image_folders(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 6)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.integers(0, 80, (20, 20, 3)) + 80 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "new").mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)).save(root / "new" / f"img{i}.png")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = FeatureNet().eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), root / "model.pt")
    _image_folders(root)
    return root


def test_fit_then_score_in_a_subprocess_equals_the_python_api(scripted, tmp_path):
    from oodscope.data.transforms import ImageNormalize
    from oodscope.data.user_data import load
    from oodscope.models.spec import IMAGENET_MEAN, IMAGENET_STD

    dets, scores = tmp_path / "dets", tmp_path / "scores.csv"
    common = [sys.executable, "-m", "oodscope.cli"]
    fit = subprocess.run(common + ["fit", "--model", str(scripted / "model.pt"), "--train", str(scripted / "train"),
                                   "--val", str(scripted / "val"), "--detectors", ",".join(DETECTORS), "--size",
                                   "16", "--out", str(dets), "--quiet", "--no-cache"],
                         capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr
    run = subprocess.run(common + ["score", "--detectors", str(dets), "--data", str(scripted / "new"), "--out",
                                   str(scores), "--quiet", "--no-cache"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(scores)
    assert table["id"].tolist() == [f"img{i}.png" for i in range(7)]

    model = torch.jit.load(str(scripted / "model.pt"))
    preprocess = ImageNormalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    options = dict(preprocess=preprocess, use_cache=False, progress=False)
    train, val, new = (load(scripted / name, image_size=16) for name in ("train", "val", "new"))
    train_out = oodscope.extract(model, (train.inputs, train.labels), **options)
    val_out = oodscope.extract(model, (val.inputs, val.labels), **options)
    new_out = oodscope.extract(model, new.inputs, **options)
    assert train_out.head is not None and train_out.features.shape == (30, 8)  # from the (logits, features) output
    for name in DETECTORS:
        detector = oodscope.create(name).fit(train_out).calibrate(val_out, keep=0.95)
        expected = detector.score(new_out)
        np.testing.assert_array_equal(table[name].to_numpy(), expected)  # identical: repr-exact floats
        np.testing.assert_array_equal(table[f"{name}_ood"].to_numpy(), (expected > detector.threshold_).astype(int))
    manifest = json.loads((dets / "detectors.json").read_text())
    assert manifest["calibrated_on"] == "val" and len(manifest["detectors"]) == len(DETECTORS)


def test_score_writes_json_and_refuses_a_changed_model_file(scripted, tmp_path):
    import shutil

    model = tmp_path / "model.pt"
    shutil.copy(scripted / "model.pt", model)
    dets = tmp_path / "dets"
    assert main(["fit", "--model", str(model), "--train", str(scripted / "train"), "--detectors", "msp,energy",
                 "--size", "16", "--out", str(dets), "--quiet", "--no-cache"]) == 0
    out = tmp_path / "s.json"
    assert main(["score", "--detectors", str(dets), "--data", str(scripted / "new"), "--out", str(out),
                 "--quiet", "--no-cache"]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 7 and {"id", "msp", "msp_ood", "energy", "energy_ood"} == set(rows[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.jit.save(torch.jit.trace(FeatureNet().eval(), torch.zeros(1, 3, 16, 16)), model)
    assert main(["score", "--detectors", str(dets), "--data", str(scripted / "new"), "--out", str(out),
                 "--quiet", "--no-cache"]) == 2


def test_fit_and_score_a_tabular_model_from_a_callable_and_a_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = plain_net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    X = rng.normal(size=(60, 4))
    frame = pd.DataFrame(X, columns=list("abcd"))
    frame["cls"] = np.arange(60) % 3
    frame["key"] = [f"row{i}" for i in range(60)]
    frame.to_csv(tmp_path / "train.csv", index=False)
    new = pd.DataFrame(np.vstack([rng.normal(size=(5, 4)), rng.normal(size=(3, 4)) + 8.0]), columns=list("abcd"))
    new["key"] = [f"n{i}" for i in range(8)]
    new.to_csv(tmp_path / "new.csv", index=False)
    spec = f"{Path(__file__).stem}:plain_net"
    dets = tmp_path / "dets"
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert main(["fit", "--model", spec, "--weights", str(tmp_path / "w.pt"), "--train",
                     str(tmp_path / "train.csv"), "--label-column", "cls", "--id-column", "key", "--detectors",
                     "mahalanobis,energy", "--out", str(dets), "--quiet", "--no-cache"]) == 0
        assert main(["score", "--detectors", str(dets), "--data", str(tmp_path / "new.csv"), "--id-column", "key",
                     "--out", str(tmp_path / "s.csv"), "--quiet", "--no-cache"]) == 0
    finally:
        sys.path.remove(str(Path(__file__).parent))
    table = pd.read_csv(tmp_path / "s.csv")
    assert table["id"].tolist() == [f"n{i}" for i in range(8)]
    assert table["mahalanobis"][5:].min() > table["mahalanobis"][:5].max()  # the shifted rows are the far ones
    assert table["mahalanobis_ood"][5:].tolist() == [1, 1, 1]


def test_fit_and_score_parquet_tables(tmp_path):
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = plain_net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    frame = pd.DataFrame(rng.normal(size=(60, 4)), columns=list("abcd"))
    frame["cls"] = np.arange(60) % 3
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    new = rng.normal(size=(6, 4))
    new[3:] += 8.0
    pd.DataFrame(new, columns=list("abcd")).to_parquet(tmp_path / "new.parquet", index=False)
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert main(["fit", "--model", f"{Path(__file__).stem}:plain_net", "--weights", str(tmp_path / "w.pt"),
                     "--train", str(tmp_path / "train.parquet"), "--label-column", "cls", "--detectors",
                     "mahalanobis", "--out", str(tmp_path / "dets"), "--quiet", "--no-cache"]) == 0
        assert main(["score", "--detectors", str(tmp_path / "dets"), "--data", str(tmp_path / "new.parquet"),
                     "--out", str(tmp_path / "s.parquet"), "--quiet", "--no-cache"]) == 0
    finally:
        sys.path.remove(str(Path(__file__).parent))
    from oodscope.models.spec import AsFloat32

    train_out = oodscope.extract(net, (frame[list("abcd")].to_numpy(), frame["cls"].to_numpy()),
                                 preprocess=AsFloat32(), use_cache=False, progress=False)
    new_out = oodscope.extract(net, new, preprocess=AsFloat32(), use_cache=False, progress=False)
    expected = oodscope.create("mahalanobis").fit(train_out).calibrate(train_out, keep=0.95).score(new_out)
    table = pd.read_parquet(tmp_path / "s.parquet")
    assert table["id"].tolist() == [str(i) for i in range(6)]
    np.testing.assert_array_equal(table["mahalanobis"].to_numpy(), expected)
    assert table["mahalanobis_ood"].tolist() == [0, 0, 0, 1, 1, 1]


def stand_in_torchvision(calls: list) -> object:
    """A module with torchvision's model API (``get_model_weights``, ``get_model``, a weights enum with ``url``,
    ``meta``, ``transforms()``) whose ``get_model(weights=W)`` reads ``W.url`` through ``torch.hub`` the way
    torchvision's ``WeightsEnum.get_state_dict`` does. There is no CPU torchvision wheel for this torch on the
    package index (the CUDA build fails to load its ops), so the spec code is checked against the real hub cache
    with this stand-in."""
    import enum
    import types

    class Transforms:
        crop_size, mean, std = [20], [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]

    class Weights(enum.Enum):
        V1 = "https://download.example.org/models/tinynet-0123abcd.pth"

        @property
        def url(self):
            return self.value

        @property
        def meta(self):
            return {"categories": ["a", "b", "c"]}

        def transforms(self):
            return Transforms()

    Weights.DEFAULT = Weights.V1

    def get_model_weights(name):
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        return Weights

    def get_model(name, weights=None, num_classes=3):
        calls.append(weights)
        model = plain_net()
        if weights is not None:
            model.load_state_dict(torch.hub.load_state_dict_from_url(weights.url, weights_only=True))
        return model

    models = types.SimpleNamespace(get_model_weights=get_model_weights, get_model=get_model)
    return types.SimpleNamespace(models=models)


def test_torchvision_specs_read_the_hub_cache_and_name_the_missing_file(tmp_path, monkeypatch):
    from oodscope.models.spec import ModelSpec, load

    calls: list = []
    monkeypatch.setitem(sys.modules, "torchvision", stand_in_torchvision(calls))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise OSError(f"offline: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match=r"hub/checkpoints/tinynet-0123abcd.pth is missing .* --weights FILE"):
        load(ModelSpec("torchvision:tinynet"))
    with pytest.raises(ValueError, match="torchvision:resnet: Unknown model"):
        load(ModelSpec("torchvision:resnet"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = plain_net()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)  # torch.hub made it before the failed download
    torch.save(net.state_dict(), cache / "tinynet-0123abcd.pth")
    model, _, resolved = load(ModelSpec("torchvision:tinynet:V1"), images=False)
    for mine, cached in zip(model.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(mine, cached, rtol=0, atol=0)
    assert resolved.size == 20 and calls[-1].name == "V1"
    _, preprocess, resolved = load(ModelSpec("torchvision:tinynet"))  # images: the weights' own statistics
    assert resolved.mean == (0.5, 0.4, 0.3) and resolved.std == (0.2, 0.2, 0.2)
    torch.save(net.state_dict(), tmp_path / "mine.pt")  # --weights FILE: a state dict instead of the cache
    model, _, resolved = load(ModelSpec("torchvision:tinynet", weights=str(tmp_path / "mine.pt")), images=False)
    assert calls[-1] is None and str(tmp_path / "mine.pt") in resolved.files_sha256
    torch.testing.assert_close(model[0].weight, net[0].weight, rtol=0, atol=0)


def test_a_local_hugging_face_image_classifier_is_a_model_spec(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
    from oodscope.models.spec import ModelSpec, load

    model, preprocess, resolved = load(ModelSpec(f"hf:{tmp_path / 'hf'}", size=32))
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    out = oodscope.extract(model, images, preprocess=preprocess, use_cache=False, progress=False)
    with torch.no_grad():
        expected = model(preprocess(torch.from_numpy(images))).logits.numpy()
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
    assert out.features.shape == (6, 16) and resolved.size == 32


@pytest.mark.parametrize("argv, message", [
    (["fit", "--model", "nope", "--train", "x", "--out", "o"], "not a zoo name"),
    (["fit", "--model", "cifar10_resnet20", "--train", "x", "--out", "o", "--detectors", "mspp"], "mspp"),
    (["fit", "--model", "cifar10_resnet20", "--train", "x", "--out", "o", "--device", "cuda:7"], "device"),
    (["fit", "--model", "cifar10_resnet20", "--train", "x", "--out", "o", "--keep", "1.5"], "--keep"),
    (["score", "--detectors", "missing_dir", "--data", "x", "--out", "s.csv"], "oodscope fit"),
    (["fit", "--model", "torchvision:nonexistent_net", "--train", "x.npz", "--out", "o"], "torchvision"),
    (["fit", "--model", "missing.pt", "--train", "x.npz", "--out", "o"], "no such file"),
])
def test_user_mistakes_print_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"oodscope {argv[0]}: error:")


def test_debug_shows_the_traceback_and_version_prints(capsys):
    with pytest.raises(ValueError):
        main(["--debug", "fit", "--model", "nope", "--train", "x", "--out", "o"])
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"oodscope {oodscope.__version__}"


def test_user_data_files_and_their_errors(tmp_path):
    from oodscope.data.user_data import load

    np.savez(tmp_path / "a.npz", X=np.ones((4, 3)), y=np.arange(4))
    data = load(tmp_path / "a.npz")
    assert data.kind == "table" and data.labels.tolist() == [0, 1, 2, 3] and data.ids == ["0", "1", "2", "3"]
    np.save(tmp_path / "b.npy", np.zeros((2, 8, 8, 3), np.uint8))
    assert load(tmp_path / "b.npy").kind == "images"
    np.savez(tmp_path / "c.npz", X=np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN"):
        load(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", Z=np.ones((2, 2)))
    with pytest.raises(ValueError, match="'images' or 'X'"):
        load(tmp_path / "d.npz")
    (tmp_path / "e.txt").write_text("missing.png 0\n")
    with pytest.raises(ValueError, match="do not exist"):
        load(tmp_path / "e.txt")
    (tmp_path / "a.bak").write_text("x")
    with pytest.raises(ValueError, match="expected an image folder"):
        load(tmp_path / "a.bak")


def test_a_torch_export_program_with_a_dynamic_batch_is_a_model_spec(tmp_path):
    from oodscope.models.spec import ModelSpec, load

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = FeatureNet().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.zeros(2, 3, 16, 16),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "model.pt2")
    model, preprocess, resolved = load(ModelSpec(str(tmp_path / "model.pt2")))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    out = oodscope.extract(model, images, preprocess=preprocess, use_cache=False, progress=False)
    with torch.no_grad():
        logits, features = net(preprocess(torch.from_numpy(images)))
    np.testing.assert_allclose(out.logits, logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.features, features.numpy(), rtol=1e-5, atol=1e-6)
    assert list(resolved.files_sha256) == [str((tmp_path / "model.pt2").resolve())]
