"""Benchmark folders (npz, image folders, OpenOOD image lists), overlaps, corruptions, full spectrum, the zoo,
and the ``bench`` CLI end to end on a tiny benchmark (results files, report.html in headless Chromium, cache)."""

import hashlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from oodscope.cli import main
from oodscope.data import corruptions
from oodscope.data.spec import (OverlapWarning, count_shared, image_hashes, load_benchmark_dir, select_groups)
from oodscope.evaluation import Results
from oodscope.fullspectrum import flagged_share, full_spectrum_records
from oodscope.metrics import auroc, ood_metrics
from oodscope.models.cifar_resnet import build_cifar_resnet, check_sha256_prefix, load_cifar_resnet
from oodscope.results_io import read_results

SPEC = """name = "tiny"
image_size = 32
[id]
train = "train.npz"
val = "val.npz"
test = "test.npz"
[ood.val]
noise = "ood_val.npz"
[ood.near]
blobs = "near.npz"
[ood.far]
flat = "far.npz"
"""


def _save(path, images, labels):
    np.savez(path, images=images, labels=np.asarray(labels, dtype=np.int64))


def _write_bench(folder, rng, n_train=64, n_test=24, spec=SPEC):
    """A tiny 32 x 32 benchmark: ID = smooth class-coloured images, OOD = noise / stripes / flat colours."""
    folder.mkdir(parents=True, exist_ok=True)

    def id_images(n):
        labels = rng.integers(0, 10, n)
        base = (labels[:, None, None, None] * 25 + np.linspace(0, 20, 32)[None, :, None, None]).astype(np.uint8)
        images = np.broadcast_to(base, (n, 32, 32, 3)) + rng.integers(0, 10, (n, 32, 32, 3))
        return images.astype(np.uint8), labels

    for name, n in (("train", n_train), ("val", 16), ("test", n_test)):
        _save(folder / f"{name}.npz", *id_images(n))
    _save(folder / "ood_val.npz", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), -np.ones(16))
    stripes = np.zeros((20, 32, 32, 3), np.uint8)
    stripes[:, ::2] = 255
    _save(folder / "near.npz", stripes, -np.ones(20))
    flat = np.repeat(rng.integers(0, 256, (20, 1, 1, 3), dtype=np.uint8), 32, 1).repeat(32, 2)
    _save(folder / "far.npz", flat, -np.ones(20))
    (folder / "benchmark.toml").write_text(spec)
    return folder


@pytest.fixture
def tiny_bench(tmp_path, rng):
    return _write_bench(tmp_path / "bench", rng)


@pytest.fixture
def random_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet20_random.pth"
    torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), path)
    return path


# -- spec loading ------------------------------------------------------------------------------------------------
def test_npz_bench_loads_with_labels_sources_and_ood_minus_one(tiny_bench):
    bench = load_benchmark_dir(tiny_bench)
    assert set(bench.datasets()) == {"train", "val", "test", "ood_val/noise", "near/blobs", "far/flat"}
    assert bench.train.inputs.shape == (64, 32, 32, 3) and bench.train.labels.max() <= 9
    assert all((s.labels == -1).all() for n, s in bench.datasets().items() if "/" in n)
    assert bench.sources["near/blobs"] == "near.npz" and bench.overlaps == {}


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_and_openood_image_list_sources(tmp_path, rng):
    bench = _write_bench(tmp_path / "b", rng)
    big = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # resized (shorter side 32) + center-cropped
    for index in range(3):
        _png(bench / "textures" / f"t{index}.png", big)
    root = tmp_path / "images_classic"
    small = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    for index, image in enumerate(small):
        _png(root / "tin" / f"val_{index}.JPEG".replace("JPEG", "png"), image)
    lines = "".join(f"tin/val_{i}.png {i}\n" for i in range(4))
    (bench / "lists").mkdir()
    (bench / "lists" / "test_tin.txt").write_text(lines)
    for cls in ("a", "b"):  # an ImageFolder-style ID test split: labels by sorted class folder
        for index in range(2):
            _png(bench / "test_folder" / cls / f"{index}.png", small[index])
    spec = SPEC.replace('test = "test.npz"', 'test = "test_folder"').replace(
        'flat = "far.npz"', 'textures = "textures"\ntin = { list = "lists/test_tin.txt", root = "../images_classic" }')
    (bench / "benchmark.toml").write_text(spec)
    with pytest.warns(OverlapWarning, match="2 of 4 images of OOD set 'far/tin'"):  # the ID test reuses 2
        loaded = load_benchmark_dir(bench)
    assert loaded.ood["far"]["textures"].inputs.shape == (3, 32, 32, 3)
    # bilinear 64x48 -> 43x32, center crop: compare with PIL's own resize of the same image
    from PIL import Image

    expected = np.asarray(Image.fromarray(big).resize((43, 32), Image.BILINEAR, reducing_gap=None))[:, 5:37]
    assert (loaded.ood["far"]["textures"].inputs[0] == expected).all()
    tin = loaded.ood["far"]["tin"]
    assert (tin.inputs == np.stack(small)).all() and (tin.labels == -1).all()
    assert loaded.test.labels.tolist() == [0, 0, 1, 1] and (loaded.test.inputs[1] == small[1]).all()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("near.npz", "missing.npz"), "missing.npz does not exist"),
    (lambda s: "colour = 1\n" + s, r"unknown keys \['colour'\]"),
    (lambda s: s.replace("[id]", "[id]\nextra = \"x.npz\""), r"unknown keys in \[id\]: \['extra'\]"),
    (lambda s: s.replace('val = "val.npz"\n', ""), r"\[id\] needs 'val'"),
    (lambda s: s.replace('flat = "far.npz"', 'flat = { list = "l.txt", path = "x" }'), "either 'path' or 'list'"),
])
def test_spec_errors_name_the_file_or_key(tiny_bench, edit, message):
    (tiny_bench / "benchmark.toml").write_text(edit(SPEC))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_benchmark_dir(tiny_bench)


def test_wrong_array_shapes_and_bad_list_lines_are_refused(tiny_bench):
    _save(tiny_bench / "near.npz", np.zeros((5, 32, 32), np.uint8), -np.ones(5))
    with pytest.raises(ValueError, match=r"near.npz: images must be uint8 N x H x W x 3"):
        load_benchmark_dir(tiny_bench)
    _save(tiny_bench / "near.npz", np.zeros((5, 16, 16, 3), np.uint8), -np.ones(5))
    with pytest.raises(ValueError, match=r"near.npz: images are 16x16, the spec says 32"):
        load_benchmark_dir(tiny_bench)
    _save(tiny_bench / "near.npz", np.zeros((5, 32, 32, 3), np.uint8), -np.ones(4))
    with pytest.raises(ValueError, match=r"near.npz: 5 images need integer labels"):
        load_benchmark_dir(tiny_bench)
    (tiny_bench / "l.txt").write_text("a.png 0\nb.png\n")
    (tiny_bench / "benchmark.toml").write_text(SPEC.replace('"near.npz"', '"l.txt"'))
    with pytest.raises(FileNotFoundError, match=r"l.txt, line 1: image .*a.png does not exist"):
        load_benchmark_dir(tiny_bench)


def test_overlap_is_counted_exactly_and_warned(tiny_bench):
    test = np.load(tiny_bench / "test.npz")["images"]
    near = np.load(tiny_bench / "near.npz")["images"]
    near[[2, 5, 7]] = test[[0, 3, 3]]  # three OOD images identical to ID test images
    _save(tiny_bench / "near.npz", near, -np.ones(len(near)))
    with pytest.warns(OverlapWarning, match="3 of 20 images of OOD set 'near/blobs' are identical to ID images"):
        bench = load_benchmark_dir(tiny_bench)
    assert bench.overlaps == {"near/blobs": 3}


def test_image_hashes_match_bytewise_comparison(rng):
    a = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    b = np.concatenate([rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8), a[[5, 9, 9, 299]]])
    b[0] = a[1]
    b[1] = a[1]
    b[1, 0, 0, 0] ^= 1  # one bit away: not identical
    rows = lambda x: np.ascontiguousarray(x.reshape(len(x), -1)).view(f"V{x[0].size}").ravel()  # noqa: E731
    assert count_shared(a, b) == int(np.isin(rows(b), rows(a)).sum()) == 5
    hashes = image_hashes(a)
    assert len(np.unique(hashes)) == len(a) and (image_hashes(a[[3, 3]]) == hashes[3]).all()


def test_select_groups_keeps_named_groups_and_refuses_unknown(tiny_bench):
    bench = select_groups(load_benchmark_dir(tiny_bench), "far")
    assert list(bench.ood) == ["far"] and "ood_val/noise" in bench.datasets()
    with pytest.raises(ValueError, match=r"unknown OOD group\(s\) \['middle'\] .* its groups are far"):
        select_groups(bench, "far,middle")


# -- corruptions and full spectrum -------------------------------------------------------------------------------
def test_corruptions_are_deterministic_and_follow_their_definitions(rng):
    images = rng.integers(0, 256, (36, 32, 32, 3), dtype=np.uint8)
    shifted, pair = corruptions.shifted_copy(images)
    again, _ = corruptions.shifted_copy(images)
    assert (shifted == again).all() and shifted.dtype == np.uint8 and shifted.shape == images.shape
    assert pair.tolist() == [i % 18 for i in range(36)]
    # contrast: (x - mean) c + mean per image, c = 0.15 at severity 5
    x = images[:2].astype(np.float64) / 255
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    expected = np.clip(np.rint(((x - mean) * 0.15 + mean) * 255), 0, 255)
    assert (corruptions.corrupt(images[:2], "contrast", 5) == expected).all()
    # constant images are fixed points of blurs and pixelation; noise grows with severity
    flat = np.full((4, 32, 32, 3), 100, np.uint8)
    for name in ("gaussian_blur", "defocus_blur", "pixelate", "contrast"):
        assert (corruptions.corrupt(flat, name, 5) == flat).all(), name
    spread = [np.abs(corruptions.corrupt(flat, "gaussian_noise", s).astype(float) - 100).mean() for s in (1, 3, 5)]
    assert spread[0] < spread[1] < spread[2]
    assert 0.8 < spread[0] / (0.04 * 255 * np.sqrt(2 / np.pi)) < 1.2  # mean |N(0, c)| = c sqrt(2/pi)
    blocks = corruptions.corrupt(images[:1], "pixelate", 5)[0]  # 32 -> 20 -> 32: nearest-upsampled blocks
    assert len(np.unique(blocks.reshape(-1, 3), axis=0)) <= 400
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corruptions.corrupt(images, "fog", 1)


def test_full_spectrum_records_count_shifted_as_id(rng):
    clean, shifted, ood = rng.normal(0, 1, 200), rng.normal(1, 1, 200), rng.normal(2, 1, 100)
    results = Results(records=[], id_accuracy=None, seconds={"d": 0.0}, scores={"d": {"test": clean, "x": ood}},
                      groups={"near": ["x"]}, id_name="test")
    records = full_spectrum_records(results, {"d": shifted})
    fs = next(r for r in records if r["setting"] == "full-spectrum" and r["dataset"] == "x")
    expected = ood_metrics(np.concatenate([clean, shifted]), ood)
    assert fs["auroc"] == pytest.approx(100 * expected["auroc"]) and fs["fpr95"] == pytest.approx(100 * expected["fpr95"])
    shift = next(r for r in records if r["setting"] == "shift-sensitivity")
    assert shift["auroc"] == pytest.approx(100 * auroc(clean, shifted))
    threshold = np.sort(clean)[int(np.ceil(0.95 * 200)) - 1]
    assert shift["flagged"] == pytest.approx(100 * np.mean(shifted > threshold))
    assert flagged_share(clean, clean) == pytest.approx(5.0)


# -- model zoo ------------------------------------------------------------------------------------------------------
def test_sha256_prefix_check_and_weights_that_do_not_fit(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"not the release")
    good = hashlib.sha256(b"not the release").hexdigest()[:8]
    assert check_sha256_prefix(path, good) == path
    with pytest.raises(ValueError, match="does not start with the published prefix 4118986f"):
        check_sha256_prefix(path, "4118986f")
    # a corrupt file in the hub cache is refused (nothing is downloaded: the file exists)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "cifar10_resnet20-4118986f.pt"
    cached.parent.mkdir(parents=True)
    shutil.copy(path, cached)
    with pytest.raises(ValueError, match="cifar10_resnet20-4118986f.pt: sha256"):
        load_cifar_resnet("cifar10_resnet20")
    torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), tmp_path / "r20.pth")
    with pytest.raises(ValueError, match="do not fit model 'cifar10_resnet56'"):
        load_cifar_resnet("cifar10_resnet56", tmp_path / "r20.pth")
    with pytest.raises(ValueError, match="do not fit model 'cifar100_resnet20'"):
        load_cifar_resnet("cifar100_resnet20", tmp_path / "r20.pth")
    assert main(["bench", str(tmp_path), "--model", "cifar10_resnet21"]) == 2


# -- the CLI end to end --------------------------------------------------------------------------------------------
def _chromium_dom(html_path, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
               "--virtual-time-budget=10000", "--dump-dom", html_path.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def test_bench_cli_on_tiny_folder_writes_report_and_rerun_reads_cache(tiny_bench, random_weights, tmp_path,
                                                                       monkeypatch, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["bench", str(tiny_bench), "--model", "cifar10_resnet20", "--weights", str(random_weights),
            "--cache-dir", str(cache), "--detectors", "msp,energy,knn", "--groups", "near,far", "--quiet"]
    assert main(args + ["--out", str(out), "--full-spectrum"]) == 0
    printed = capsys.readouterr().out
    assert "ID accuracy" in printed and "shifted flagged at 95 % TPR" in printed
    meta, records = read_results(out / "results.json")
    standard = [r for r in records if "setting" not in r]
    assert all(set(r) == {"detector", "dataset", "group", "auroc", "fpr95", "aupr_in", "aupr_out"} for r in standard)
    assert {(r["detector"], r["dataset"]) for r in standard} >= {("msp", "blobs"), ("knn", "flat"), ("energy", "mean")}
    shift = [r for r in records if r.get("setting") == "shift-sensitivity"]
    assert len(shift) == 3 and all(0 <= r["flagged"] <= 100 and "shifted_accuracy" in r for r in shift)
    assert len([r for r in records if r.get("setting") == "full-spectrum"]) == 3 * 4
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("detector,dataset,group,auroc,fpr95,aupr_in,aupr_out,setting,flagged")
    html = (out / "report.html").read_text()
    assert "cifar10_resnet20" in html and hashlib.sha256(random_weights.read_bytes()).hexdigest() in html
    assert "torch" in html and "data_sha256" in html
    dom = _chromium_dom(out / "report.html", tmp_path)
    assert 'data-images-loaded="3"' in dom  # every embedded PNG decoded by the browser
    assert dom.count("<img") == 3 and '<table id="leaderboard">' in dom and '<table id="shift-sensitivity">' in dom
    board = dom[dom.index('<table id="leaderboard">'):]
    board = board[:board.index("</table>")]
    assert board.count("<tr") == 1 + 3 and all(d in board for d in ("msp", "energy", "knn"))

    # the re-run reads the extraction cache: the model is never run
    import oodscope.extraction.extract as extract_module

    def refuse(*a, **k):
        raise AssertionError("the model ran although the cache holds every split")

    monkeypatch.setattr(extract_module, "_run", refuse)
    assert main(args + ["--out", str(tmp_path / "again"), "--full-spectrum"]) == 0
    assert read_results(tmp_path / "again" / "results.json")[1] == records
    capsys.readouterr()
    assert main(args[:-3] + ["--groups", "near,middle", "--out", str(tmp_path / "x")]) == 2
    assert "unknown OOD group(s) ['middle']" in capsys.readouterr().err


# -- the built-in cifar10 benchmark, on local files in the published layouts (nothing is downloaded) ------------
def _fake_published_data(root, rng, per_class_train=4, per_class_test=3):
    import pickle

    from PIL import Image

    def batch(path, per_class, label_key, n_classes=10):
        labels = np.tile(np.arange(n_classes), per_class)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps({b"data": data, label_key: labels.tolist()}))
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train = [batch(root / "cifar-10-batches-py" / f"data_batch_{i}", 1 if i > 1 else per_class_train, b"labels")
             for i in range(1, 6)]
    test = batch(root / "cifar-10-batches-py" / "test_batch", per_class_test, b"labels")
    batch(root / "cifar-100-python" / "test", 1, b"fine_labels", n_classes=100)
    digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, 5, 28, 28))
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(header + digits.tobytes())
    for index in range(6):
        _png(root / "tiny-imagenet-200" / "val" / "images" / f"val_{index}.png",
             rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for cls in ("banded", "woven"):
        for index in range(2):
            path = root / "dtd" / "images" / cls / f"{cls}_{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return train, test


def test_builtin_cifar10_builds_the_spec_from_local_published_files(tmp_path, rng, monkeypatch):
    import sys

    from oodscope.data import cifar10
    from oodscope.data.builtin import BenchRequest, prepare

    monkeypatch.setitem(sys.modules, "torchvision", None)  # proves nothing is downloaded
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"install torchvision \(pip install 'oodscope\[vision\]'\)"):
        cifar10.build(root)
    train, test = _fake_published_data(root, rng)
    # the fake batches stand for the published ones: their md5 replaces the published sums (checked before reading)
    monkeypatch.setattr(cifar10, "CIFAR_MD5", {**cifar10.CIFAR_MD5, **{
        relative: hashlib.md5((root / relative).read_bytes()).hexdigest() for relative in cifar10.CIFAR_MD5
        if (root / relative).exists()}})
    folder = cifar10.build(root, n_train_per_class=2, n_val_per_class=1)
    bench = load_benchmark_dir(folder)
    first_x, first_y = train[0]
    # train = the first 2 images per class in file order: the first batch holds 4 per class
    assert (bench.train.inputs == first_x[:20]).all() and (bench.train.labels == first_y[:20]).all()
    assert (bench.val.inputs == test[0][:10]).all() and (bench.test.inputs == test[0][10:]).all()
    assert len(bench.ood["near"]["cifar100"]) == 100 and len(bench.ood_val["tin"]) == 3
    assert len(bench.ood["near"]["tin"]) == 3 and bench.ood["far"]["textures"].inputs.shape == (4, 32, 32, 3)
    mnist = bench.ood["far"]["mnist"].inputs
    assert mnist.shape == (5, 32, 32, 3) and (mnist[..., 0] == mnist[..., 2]).all()
    # the CLI route: --data-root / OODSCOPE_DATA resolve to the built folder
    monkeypatch.setenv("OODSCOPE_DATA", str(root))
    torch.manual_seed(0)
    weights = tmp_path / "r20.pth"
    torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), weights)
    prepared = prepare(BenchRequest(benchmark="cifar10", weights=str(weights)))
    assert prepared.model_name == "cifar10_resnet20" and len(prepared.bench.test) == 20
    assert cifar10.first_per_class(np.array([3, 1, 3, 3, 1, 2]), 2).tolist() == [0, 1, 2, 4, 5]


# -- the "done when" on the shared CIFAR-10 bench (slow: two full passes of ResNet-20) -------------------
SHARED = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-bench"


def _independent_outputs(model_path, images_by_set):
    """Logits and 64-d features computed without oodscope's extraction (plain torch, README normalisation)."""
    model = build_cifar_resnet("cifar10_resnet20")
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    model.eval()
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    out = {}
    with torch.inference_mode():
        for name, images in images_by_set.items():
            feats = []
            for start in range(0, len(images), 1000):
                x = torch.as_tensor(images[start:start + 1000]).permute(0, 3, 1, 2).float() / 255.0
                feats.append(model.forward_features((x - mean) / std))
            features = torch.cat(feats).double()
            logits = features @ model.fc.weight.double().T + model.fc.bias.double()
            out[name] = (logits.numpy(), features.numpy())
    return out, model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()


@pytest.mark.slow
def test_done_when_resnet20_on_shared_cifar10_bench(tmp_path):
    from scipy.special import logsumexp, softmax
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    if not (SHARED / "benchmark.toml").exists():
        pytest.skip("shared CIFAR-10 bench not available")
    weights = SHARED / "models" / "cifar10_resnet20.pth"
    out = tmp_path / "out"
    assert main(["bench", str(SHARED), "--model", "cifar10_resnet20", "--weights", str(weights), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet",
                 "--detectors", "msp,energy,knn,vim,mahalanobis"]) == 0
    assert "ID accuracy (test) <b id=\"id-accuracy\">92.59 %</b>" in (out / "report.html").read_text()
    records = {(r["detector"], r["dataset"]): r["auroc"] for r in read_results(out / "results.json")[1]
               if r["dataset"] != "mean"}

    sets = {"train": "cifar10_train", "test": "cifar10_test", "cifar100": "cifar100_test", "tin": "tin_test",
            "mnist": "mnist_test", "textures": "textures"}
    arrays = {k: np.load(SHARED / f"{v}.npz") for k, v in sets.items()}
    outputs, W, b = _independent_outputs(weights, {k: a["images"] for k, a in arrays.items()})
    train_logits, train_features = outputs["train"]
    train_labels = arrays["train"]["labels"]
    test_logits = outputs["test"][0]
    assert 100 * np.mean(test_logits.argmax(1) == arrays["test"]["labels"]) == pytest.approx(92.59, abs=0.005)

    normed = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
    knn = NearestNeighbors(n_neighbors=50, algorithm="brute").fit(normed(train_features))
    means = np.stack([train_features[train_labels == c].mean(0) for c in range(10)])
    precision = np.linalg.pinv(np.cov((train_features - means[train_labels]).T, bias=True))
    origin = -np.linalg.pinv(W) @ b
    centered = train_features - origin
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / len(centered))
    residual_space = eigenvectors[:, np.argsort(eigenvalues)[::-1][32:]]
    alpha = train_logits.max(1).sum() / np.linalg.norm(centered @ residual_space, axis=1).sum()

    def scores(logits, features):
        diff = features[:, None, :] - means[None]
        return {
            "msp": -softmax(logits, axis=1).max(1),
            "energy": -logsumexp(logits, axis=1),
            "knn": knn.kneighbors(normed(features))[0][:, -1],
            "mahalanobis": np.einsum("ncd,de,nce->nc", diff, precision, diff).min(1),
            "vim": alpha * np.linalg.norm((features - origin) @ residual_space, axis=1) - logsumexp(logits, axis=1),
        }

    id_scores = scores(*outputs["test"])
    for dataset in ("cifar100", "tin", "mnist", "textures"):
        ood_scores = scores(*outputs[dataset])
        for detector, values in ood_scores.items():
            truth = np.r_[np.zeros(len(id_scores[detector])), np.ones(len(values))]
            expected = 100 * roc_auc_score(truth, np.r_[id_scores[detector], values])
            assert records[detector, dataset] == pytest.approx(expected, abs=0.02), (detector, dataset)


def test_bench_takes_any_model_spec_a_torchscript_file(tiny_bench, tmp_path, capsys):
    """``oodscope bench FOLDER --model model.pt``: the same specs as ``oodscope fit`` (here TorchScript)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_cifar_resnet("cifar10_resnet20").eval()

    class WithFeatures(torch.nn.Module):  # TorchScript cannot be hooked: hand the features over
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            features = self.net.forward_features(x)
            return self.net.fc(features), features

    torch.jit.save(torch.jit.trace(WithFeatures().eval(), torch.zeros(2, 3, 32, 32)), tmp_path / "m.pt")
    out = tmp_path / "out"
    assert main(["bench", str(tiny_bench), "--model", str(tmp_path / "m.pt"), "--detectors", "msp,knn",
                 "--groups", "near", "--no-cache", "--quiet", "--out", str(out)]) == 0
    _, records = read_results(out / "results.json")
    assert {r["detector"] for r in records} == {"msp", "knn"} and all(0 <= r["auroc"] <= 100 for r in records)
    assert main(["bench", str(tiny_bench), "--model", "no_such_model", "--out", str(out)]) == 2
    assert "not a zoo name" in capsys.readouterr().err


def test_bench_protocols_on_an_image_folder_bench(tiny_bench, random_weights, tmp_path, capsys, monkeypatch):
    import oodscope.protocols.unit_tests as unit_tests

    monkeypatch.setattr(unit_tests, "N_IMAGES", 64)  # 64 images per synthetic set keep the test short
    out = tmp_path / "out"
    assert main(["bench", str(tiny_bench), "--model", "cifar10_resnet20", "--weights", str(random_weights),
                 "--detectors", "msp,knn", "--groups", "near", "--protocol", "unit-tests,failure", "--no-cache",
                 "--quiet", "--out", str(out)]) == 0
    assert "OOD unit tests" in capsys.readouterr().out
    _, records = read_results(out / "results.json")
    units = [r for r in records if r.get("setting") == "unit-tests"]
    assert len(units) == 2 * 8 and all(r["passed"] == (r["auroc"] >= 90.0) for r in units)
    failure = [r for r in records if r.get("setting") == "failure"]
    assert [r["dataset"] for r in failure] == ["test+shifted+ood"] * 2
    assert all(r["error_rate_shifted"] is not None for r in failure)


def test_bench_runs_the_generative_family_on_the_images_next_to_the_classifier_detectors(tiny_bench, random_weights,
                                                                                       tmp_path, capsys):
    out = tmp_path / "out"
    base = ["bench", str(tiny_bench), "--model", "cifar10_resnet20", "--weights", str(random_weights), "--groups",
            "near", "--no-cache", "--quiet"]
    assert main(base + ["--detectors", "msp,typicality", "--out", str(out)]) == 0
    _, records = read_results(out / "results.json")
    assert {r["detector"] for r in records} == {"msp", "typicality"}
    assert all(0 <= r["auroc"] <= 100 for r in records)
    assert main(base + ["--family", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "--family 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_family_generative_runs_every_density_detector(tiny_bench, random_weights, tmp_path):
    import oodscope

    out = tmp_path / "gen"
    assert main(["bench", str(tiny_bench), "--model", "cifar10_resnet20", "--weights", str(random_weights),
                 "--groups", "near", "--no-cache", "--quiet", "--family", "generative", "--out", str(out)]) == 0
    _, records = read_results(out / "results.json")
    assert {r["detector"] for r in records} == set(oodscope.available(family="generative"))
