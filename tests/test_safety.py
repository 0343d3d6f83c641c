"""No silent numbers: the extraction cache never returns another configuration's arrays nor loses them, user files
fail with errors that name them, and nothing the package reads can run code (issue "No silent numbers")."""

import ast
import hashlib
import io
import os
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import oodscope
from oodscope.data.transforms import ImageNormalize
from oodscope.extraction import cache

PACKAGE = Path(oodscope.__file__).resolve().parent
PRE = ImageNormalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


class Scale(nn.Module):
    """Multiplies by a plain float attribute (not a buffer): its repr, ``Scale()``, does not show it."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class FactorNet(nn.Module):
    """A tiny CNN whose forward multiplies by ``self.factor`` (outside the state dict); counts its calls."""

    cache_ignore = ("calls", "fail_after")  # bookkeeping of the test, not of the outputs

    def __init__(self, factor=1.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        self.factor = factor
        self.calls = 0
        self.fail_after = None

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.fc(self.pool(self.body(x)).flatten(1) * self.factor)


@pytest.fixture
def images(rng):
    return rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8), rng.integers(0, 3, 50)


def _direct(model, x, preprocess=PRE):
    """The model's logits computed by hand (its call counter left as it was)."""
    calls = getattr(model, "calls", 0)
    with torch.no_grad():
        out = model(preprocess(torch.as_tensor(x))).numpy()
    model.calls = calls
    return out


# -- the cache key covers everything that changes the outputs ------------------------------------------------------
def test_model_attribute_outside_the_state_dict_is_part_of_the_cache_key(images, tmp_path):
    x, y = images
    kwargs = dict(preprocess=PRE, cache_dir=tmp_path, progress=False)
    one = oodscope.extract(FactorNet(1.0), (x, y), name="f", **kwargs)
    model = FactorNet(3.0)  # same weights, another factor
    three = oodscope.extract(model, (x, y), name="f", **kwargs)
    assert model.calls > 0, "the cache returned the outputs of factor 1.0 for factor 3.0"
    assert three.logits == pytest.approx(_direct(model, x), abs=1e-5)
    assert not np.allclose(three.logits, one.logits)
    # the same configuration built again is a cache hit (the key is a function of the contents)
    again = FactorNet(3.0)
    hit = oodscope.extract(again, (x, y), name="f", **kwargs)
    assert again.calls == 0 and np.array_equal(hit.logits, three.logits)
    # an attribute of a submodule, a non-persistent buffer and the class of a parameter-free layer count too
    nested = FactorNet(3.0)
    nested.body[1] = nn.Sequential(nn.ReLU(), Scale(2.0))
    out = oodscope.extract(nested, (x, y), name="f", **kwargs)
    assert nested.calls == 1 and out.logits == pytest.approx(_direct(nested, x), abs=1e-5)
    nested.body[1][1].factor = 0.5
    out = oodscope.extract(nested, (x, y), name="f", **kwargs)
    assert nested.calls == 2 and out.logits == pytest.approx(_direct(nested, x), abs=1e-5)
    swapped = FactorNet(3.0)
    swapped.body[1] = nn.Tanh()  # no state at all: only its class tells it from ReLU
    out = oodscope.extract(swapped, (x, y), name="f", **kwargs)
    assert swapped.calls == 1 and out.logits == pytest.approx(_direct(swapped, x), abs=1e-5)
    shifted = FactorNet(3.0)
    shifted.register_buffer("unused_offset", torch.zeros(1), persistent=False)
    oodscope.extract(shifted, (x, y), name="f", **kwargs)
    shifted.unused_offset += 1
    oodscope.extract(shifted, (x, y), name="f", **kwargs)
    assert shifted.calls == 2


def test_preprocessing_module_is_keyed_by_its_contents_not_its_repr(images, tmp_path):
    x, y = images
    model = FactorNet()
    kwargs = dict(cache_dir=tmp_path, progress=False)
    first = oodscope.extract(model, (x, y), name="p", preprocess=nn.Sequential(PRE, Scale(1.0)), **kwargs)
    assert repr(Scale(1.0)) == repr(Scale(3.0))
    calls = model.calls
    pre3 = nn.Sequential(PRE, Scale(3.0))
    third = oodscope.extract(model, (x, y), name="p", preprocess=pre3, **kwargs)
    assert model.calls > calls, "Scale(3.0) got the cached outputs of Scale(1.0)"
    assert third.logits == pytest.approx(_direct(model, x, pre3), abs=1e-5)
    assert not np.allclose(third.logits, first.logits)
    calls = model.calls
    oodscope.extract(model, (x, y), name="p", preprocess=nn.Sequential(PRE, Scale(3.0)), **kwargs)
    assert model.calls == calls  # the same contents: a hit


def test_what_cannot_be_keyed_is_not_cached_with_one_warning(images, tmp_path):
    x, y = images
    model = FactorNet()
    model.post = lambda t: t * 2  # a lambda attribute: what it captures cannot be keyed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = oodscope.extract(model, (x, y), name="u", preprocess=PRE, cache_dir=tmp_path, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "not cached" in messages[0] and "attribute post" in messages[0]
    assert "\n" not in messages[0]
    assert out.logits == pytest.approx(_direct(model, x), abs=1e-5)
    assert not list(tmp_path.iterdir())


def test_cache_keys_are_the_same_in_every_process(tmp_path):
    """Sets and frozensets of strings (in attributes and in code constants) are ordered by a salted hash."""
    script = tmp_path / "key.py"
    script.write_text(
        "import torch\nfrom torch import nn\nfrom oodscope.extraction.keys import module_key\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); torch.manual_seed(0); self.fc = nn.Linear(2, 2)\n"
        "        self.names = {'alpha', 'beta', 'gamma', 'delta'}; self.table = {'b': (1, 2.5), 'a': [None, 'x']}\n"
        "    def forward(self, x):\n"
        "        return self.fc(x) if 'x' in {'x', 'y', 'z', 'w'} else x\n"
        "print(module_key(M()))\n")
    keys = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        keys.add(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                                check=True).stdout.strip())
    assert len(keys) == 1


# -- the cache directory: not writable, file modes, stale temporary files --------------------------------------------
def test_read_only_cache_directory_returns_the_outputs_and_warns_once(images, tmp_path, monkeypatch):
    x, y = images
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_open = os.open

    def refuse(path, *args, **kwargs):  # what a read-only directory does, also for root
        if str(path).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cache.os, "open", refuse)
    model = FactorNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = oodscope.extract(model, (x, y), name="a", preprocess=PRE, cache_dir=locked, progress=False,
                             batch_size=8, checkpoint_every=2)
        b = oodscope.extract(model, (x[:20], y[:20]), name="b", preprocess=PRE, cache_dir=locked, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "not writable" in messages[0] and str(locked) in messages[0]
    assert a.logits == pytest.approx(_direct(model, x), abs=1e-5) and len(b.logits) == 20
    assert not list(locked.iterdir())
    locked.chmod(0o755)


def test_entries_get_the_umask_mode_and_are_written_through_named_temporary_files(images, tmp_path, monkeypatch):
    x, y = images
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(cache.os, "replace", lambda src, dst: replaced.append(Path(src).name) or real_replace(src, dst))
    old = os.umask(0o022)
    try:
        oodscope.extract(FactorNet(), (x, y), name="m", preprocess=PRE, cache_dir=tmp_path / "c", progress=False)
        os.umask(0o002)
        oodscope.extract(FactorNet(), (x[:9], y[:9]), name="g", preprocess=PRE, cache_dir=tmp_path / "c",
                         progress=False)
    finally:
        os.umask(old)
    modes = {p.name.split("-")[0]: p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()}
    assert modes == {"m": 0o644, "g": 0o664}
    assert replaced and all(n.endswith(cache.TMP_SUFFIX) and f".{os.getpid()}." in n for n in replaced)


def test_stale_temporary_files_are_removed_when_the_cache_is_opened(images, tmp_path):
    x, y = images
    folder = tmp_path / "shared"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = cache._host()
    names = {
        "dead": f"a-1.npz.{host}.{dead.pid}.0a1b2c3d{cache.TMP_SUFFIX}",  # its writer is gone
        "live": f"b-1.npz.{host}.{os.getpid()}.0a1b2c3d{cache.TMP_SUFFIX}",  # being written now
        "old_foreign": f"c-1.npz.otherhost.123.0a1b2c3d{cache.TMP_SUFFIX}",  # another machine, 2 hours old
        "new_foreign": f"d-1.npz.otherhost.123.0a1b2c3d{cache.TMP_SUFFIX}",
        "old_legacy": "e-1.npz.k3j4h5l6.tmp",  # mkstemp names of earlier versions
        "new_legacy": "f-1.npz.k3j4h5l6.tmp",
        "entry": "g-1.npz",
    }
    for kind, name in names.items():
        (folder / name).write_bytes(b"x" * 1000)
        if kind.startswith("old") or kind == "entry":
            past = time.time() - 2 * 3600
            os.utime(folder / name, (past, past))
    oodscope.extract(FactorNet(), (x, y), name="h", preprocess=PRE, cache_dir=folder, progress=False)
    left = {p.name for p in folder.iterdir()}
    assert {names[k] for k in ("live", "new_foreign", "new_legacy", "entry")} <= left
    assert not {names[k] for k in ("dead", "old_foreign", "old_legacy")} & left


# -- resuming an interrupted extraction ------------------------------------------------------------------------------
@pytest.mark.parametrize("as_dataset", [False, True])
def test_interrupted_extraction_resumes_at_batch_granularity(images, tmp_path, as_dataset):
    x, y = images
    data = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y)) if as_dataset else (x, y)
    kwargs = dict(name="r", preprocess=PRE, batch_size=4, checkpoint_every=3, layers=["body.0"], progress=False)
    n_batches = -(-len(x) // 4)  # 13
    reference = oodscope.extract(FactorNet(), data, cache_dir=tmp_path / "straight", **kwargs)

    model = FactorNet()
    model.fail_after = 8  # killed during batch 9: chunks of batches 0-2 and 3-5 are on disk, 6-7 are lost
    with pytest.raises(KeyboardInterrupt):
        oodscope.extract(model, data, cache_dir=tmp_path / "cut", **kwargs)
    assert len(list((tmp_path / "cut").glob("*.part*"))) == 2
    model.calls, model.fail_after = 0, None
    resumed = oodscope.extract(model, data, cache_dir=tmp_path / "cut", **kwargs)
    assert model.calls == n_batches - 6  # only the batches no chunk holds
    for field in ("logits", "features", "labels"):
        assert np.array_equal(getattr(resumed, field), getattr(reference, field)), field
    assert np.array_equal(resumed.layers["body.0"], reference.layers["body.0"])
    assert [p.name.endswith(".npz") for p in (tmp_path / "cut").iterdir()] == [True]  # chunks assembled, removed
    oodscope.extract(model, data, cache_dir=tmp_path / "cut", **kwargs)
    assert model.calls == n_batches - 6  # the finished entry is a hit


def test_chunks_of_another_batch_size_or_corrupt_chunks_are_not_used(images, tmp_path):
    x, y = images
    kwargs = dict(name="r", preprocess=PRE, checkpoint_every=2, progress=False, cache_dir=tmp_path)
    model = FactorNet()
    model.fail_after = 5
    with pytest.raises(KeyboardInterrupt):
        oodscope.extract(model, (x, y), batch_size=4, **kwargs)
    model.calls, model.fail_after = 0, None
    out = oodscope.extract(model, (x, y), batch_size=5, **kwargs)  # other batches: start over
    assert model.calls == 10 and out.logits == pytest.approx(_direct(model, x), abs=1e-5)
    model.fail_after = model.calls + 5
    with pytest.raises(KeyboardInterrupt):
        oodscope.extract(model, (x[:40], y[:40]), batch_size=4, **kwargs)
    first = sorted(tmp_path.glob("*.part*"))[0]
    first.write_bytes(first.read_bytes()[:-50])
    model.calls, model.fail_after = 0, None
    with pytest.warns(UserWarning, match="unusable"):
        out = oodscope.extract(model, (x[:40], y[:40]), batch_size=4, **kwargs)
    assert model.calls == 10 and out.logits == pytest.approx(_direct(model, x[:40]), abs=1e-5)
    with pytest.raises(ValueError, match="checkpoint_every"):
        oodscope.extract(model, x, preprocess=PRE, checkpoint_every=-1, use_cache=False, progress=False)


# -- files given on the command line ---------------------------------------------------------------------------------
SPEC = """name = "tiny"
[id]
train = "train.npz"
val = "val.npz"
test = "test.npz"
[ood.{group}]
noise = "noise.npz"
[ood.near]
noise2 = "noise.npz"
"""


def _bench(folder, rng, group="val"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        np.savez(folder / f"{name}.npz", images=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(10) % 3)
    np.savez(folder / "noise.npz", images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), labels=-np.ones(6, int))
    (folder / "benchmark.toml").write_text(SPEC.format(group=group))
    return folder


def test_truncated_corrupt_or_object_npz_files_are_named(tmp_path, rng):
    from oodscope.data.spec import load_benchmark_dir

    folder = _bench(tmp_path / "b", rng)
    train = folder / "train.npz"
    good = train.read_bytes()
    train.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=rf"{train}.* truncated or corrupt"):
        load_benchmark_dir(folder)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    train.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=rf"{train}: array 'images' is truncated or corrupt"):
        load_benchmark_dir(folder)
    np.savez(train, images=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             labels=np.array([{"label": 1}] * 10, dtype=object))
    with pytest.raises(ValueError, match=rf"{train}: array 'labels' is an object array"):
        load_benchmark_dir(folder)
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(train)
    with pytest.raises(ValueError, match=rf"{train} holds a single .npy array"):
        load_benchmark_dir(folder)


def test_corrupt_or_pickled_weights_give_a_clear_error_without_unsafe_advice(tmp_path, rng, capsys):
    from oodscope.cli import main
    from oodscope.models.cifar_resnet import build_cifar_resnet, load_cifar_resnet

    weights = tmp_path / "w.pth"
    torch.save(build_cifar_resnet("cifar10_resnet20").state_dict(), weights)
    good = weights.read_bytes()
    weights.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=rf"weights file {weights} is truncated or corrupt") as error:
        load_cifar_resnet("cifar10_resnet20", weights)
    assert "weights_only" not in str(error.value) and error.value.__cause__ is None
    torch.save(build_cifar_resnet("cifar10_resnet20"), weights)  # a whole pickled model
    with pytest.raises(ValueError, match=rf"{weights} holds a pickled .*CifarResNet, not only tensors"):
        load_cifar_resnet("cifar10_resnet20", weights)
    weights.write_bytes(good[:len(good) // 3])
    folder = _bench(tmp_path / "b", rng)
    assert main(["bench", str(folder), "--model", "cifar10_resnet20", "--weights", str(weights), "--quiet",
                 "--no-cache", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated or corrupt" in err and "weights_only" not in err


def test_a_near_miss_of_a_reserved_group_name_warns(tmp_path, rng):
    from oodscope.data.spec import SpecWarning, load_benchmark_dir

    with pytest.warns(SpecWarning, match=r"\[ood\.vall\] looks like a misspelling of the reserved group \[ood\.val\]"):
        bench = load_benchmark_dir(_bench(tmp_path / "typo", rng, group="vall"))
    assert "vall" in bench.ood  # still loaded as the spec says
    with pytest.warns(SpecWarning, match=r"\[ood\.validation\]"):
        load_benchmark_dir(_bench(tmp_path / "word", rng, group="validation"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for group in ("val", "far", "near2"):
            load_benchmark_dir(_bench(tmp_path / group, rng, group=group))


# -- security: nothing read can run code ------------------------------------------------------------------------------
# files that may import pickle, with the reason; nothing may call pickle.load(s), dill or joblib.load
PICKLE_EXCEPTIONS = {
    "data/cifar10.py": "the CIFAR python batches are pickles: read with a restricted Unpickler whose find_class "
                       "allows numpy's array reconstruction only, after their published md5 is checked",
}


def _calls(tree):
    """``(call node, dotted name)`` of every call, import aliases resolved (``import numpy as onp``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            try:
                name = ast.unparse(node.func)
            except Exception:  # noqa: BLE001
                continue
            head, _, rest = name.partition(".")
            resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
            yield node, resolved.replace("numpy.", "np.", 1) if resolved.startswith("numpy.") else resolved


def _keyword_is(node, name, value):
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords)


# loading the model file the user names with --model: TorchScript's own deserialiser (it builds TorchScript
# modules and tensors only, no arbitrary Python objects); running a model is running its code, as with
# package.module:callable, so only the user's chosen file goes through it (oodscope.models.spec)
MODEL_FILE_LOADERS = {("models/spec.py", "torch.jit.load")}


def _unsafe_loads(source, relative):
    problems = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            root = name.split(".")[0]
            if root in ("dill", "joblib", "cloudpickle", "shelve", "marshal") or (
                    root in ("pickle", "_pickle", "cPickle") and relative not in PICKLE_EXCEPTIONS):
                problems.append(f"{relative}:{node.lineno} imports {name}")
    for node, name in _calls(tree):
        line = f"{relative}:{node.lineno}"
        if name in ("torch.load", "torch.serialization.load") and not _keyword_is(node, "weights_only", True):
            problems.append(f"{line} calls {name} without weights_only=True")
        if name in ("np.load", "np.lib.npyio.load") and not _keyword_is(node, "allow_pickle", False):
            problems.append(f"{line} calls {name} without allow_pickle=False")
        if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "_pickle") and name.split(".")[-1] in (
                "load", "loads", "Unpickler"):
            problems.append(f"{line} calls {name}")
        if name in ("torch.hub.load", "torch.jit.load", "np.fromfile") or name.endswith("load_state_dict_from_url"):
            if (relative, name) not in MODEL_FILE_LOADERS:
                problems.append(f"{line} calls {name}")
    return problems


def test_the_package_never_unpickles_untrusted_files():
    problems = [p for path in sorted(PACKAGE.rglob("*.py"))
                for p in _unsafe_loads(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    assert not problems, "\n".join(problems)
    # the scan sees through aliases and multi-line calls
    sample = ("import torch as T\nimport numpy as onp\nfrom pickle import loads\nimport joblib\n"
              "T.load(p,\n       map_location='cpu')\nonp.load(p)\nloads(b'')\njoblib.load(p)\n"
              "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=False)\n")
    found = _unsafe_loads(sample, "x.py")
    assert len(found) == 7 and any(":10 " in f for f in found) and not any(":11 " in f for f in found), found


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_training_checkpoint_runs_nothing_and_a_real_one_loads_with_weights_only(tmp_path):
    from oodscope.text import finetune

    marker = tmp_path / "ran"
    planted = tmp_path / "ck.pt"
    torch.save({"settings": "x", "model": {}, "optimizer": {}, "rng": torch.get_rng_state(), "step": 1,
                "losses": [_Planted(marker)]}, planted)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=rf"{planted} holds a pickled .*system"):
        finetune._resume(planted, "x", model, optimizer, "finetune_full", 10, None)
    assert not marker.exists()
    # a real checkpoint (weights, Adam moments, RNG state, step, losses) loads with weights_only=True
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    finetune._checkpoint(tmp_path / "real.pt", "s", model, optimizer, 7, [0.5, np.float32(0.25)])
    state = torch.load(tmp_path / "real.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 7 and state["losses"] == [0.5, 0.25]
    fresh = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    assert finetune._resume(tmp_path / "real.pt", "s", fresh, fresh_optimizer, "t", 10, None) == (7, [0.5, 0.25])
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("dotted", ["subprocess.Popen", "os.system", "pyod.models.knn.np.load",
                                    "pyod.models.base.BaseDetector", "pyod.models.knn.check_array",
                                    "pyod.models..knn.KNN", "pyod.modelsx.KNN"])
def test_pyod_adapter_refuses_anything_but_pyod_detector_classes(dotted, monkeypatch):
    pytest.importorskip("pyod")
    import subprocess as subprocess_module

    from oodscope.detectors.anomaly import pyod_adapter

    imported = []
    real_import = pyod_adapter.importlib.import_module
    monkeypatch.setattr(pyod_adapter.importlib, "import_module",
                        lambda name, *a: imported.append(name) or real_import(name, *a))

    def called(*args, **kwargs):
        raise AssertionError("a refused model was called")

    monkeypatch.setattr(subprocess_module, "Popen", called)
    monkeypatch.setattr(os, "system", called)
    with pytest.raises(ValueError, match="not a PyOD detector class|cannot import load from pyod.models.knn.np"):
        pyod_adapter.resolve_model(dotted, {"args": ["touch", "/tmp/x"]}, "pyod")
    assert not [name for name in imported if not name.startswith("pyod")]
    assert type(pyod_adapter.resolve_model("pyod.models.knn.KNN", {"n_neighbors": 3}, "pyod")).__name__ == "KNN"


def test_release_weights_are_checked_by_their_full_sha256_where_known(tmp_path, monkeypatch):
    """The download code, run on a local file:// 'release' (nothing is fetched from the network)."""
    from oodscope.models import cifar_resnet

    torch.manual_seed(0)
    server = tmp_path / "server"
    server.mkdir()
    release = server / "file.pt"
    torch.save(cifar_resnet.build_cifar_resnet("cifar10_resnet20").state_dict(), release)
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    release = release.rename(server / f"cifar10_resnet20-{digest[:8]}.pt")
    monkeypatch.setattr(cifar_resnet, "RELEASE", server.as_uri() + "/{name}-{sha}.pt")
    monkeypatch.setitem(cifar_resnet.RELEASE_SHA256_PREFIX, "cifar10_resnet20", digest[:8])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / release.name
    # the right prefix but not the pinned full digest: refused, and nothing is kept in the hub cache
    monkeypatch.setitem(cifar_resnet.RELEASE_SHA256, "cifar10_resnet20", digest[:8] + "0" * 56)
    with pytest.raises(ValueError, match=rf"sha256 {digest} is not the release's {digest[:8]}0000"):
        cifar_resnet.load_cifar_resnet("cifar10_resnet20")
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())
    monkeypatch.setitem(cifar_resnet.RELEASE_SHA256, "cifar10_resnet20", digest)
    model = cifar_resnet.load_cifar_resnet("cifar10_resnet20")
    assert cached.exists() and not model.training
    # a cached file changed later (same prefix is not enough) is refused on the next load
    monkeypatch.setitem(cifar_resnet.RELEASE_SHA256, "cifar10_resnet20", "f" * 64)
    with pytest.raises(ValueError, match="is not the release's"):
        cifar_resnet.load_cifar_resnet("cifar10_resnet20")
    # a download that fails torch hub's prefix check is a ValueError naming the URL
    cached.unlink()
    monkeypatch.setitem(cifar_resnet.RELEASE_SHA256_PREFIX, "cifar10_resnet20", "00000000")
    (server / "cifar10_resnet20-00000000.pt").write_bytes(release.read_bytes())
    with pytest.raises(ValueError, match="failed its sha256 check"):
        cifar_resnet.load_cifar_resnet("cifar10_resnet20")


def test_shared_checkpoints_are_not_the_release_files():
    """Why RELEASE_SHA256 pins nothing yet: the shared checkpoints are re-saved copies with other bytes."""
    from oodscope.models.cifar_resnet import RELEASE_SHA256, RELEASE_SHA256_PREFIX

    models = PACKAGE.parents[1] / "shared" / "data" / "cifar10-bench" / "models"
    if not models.exists():
        pytest.skip("shared checkpoints not available")
    for path in sorted(models.glob("cifar10_resnet*.pth")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert not digest.startswith(RELEASE_SHA256_PREFIX[path.stem]), f"{path} may be the release: pin {digest}"
    assert all(len(v) == 64 for v in RELEASE_SHA256.values())


# -- CIFAR python batches: md5 first, and an unpickler that builds no objects ----------------------------------------
def _py2_batch(data, labels, label_key):
    """A protocol-2 pickle as Python 2's cPickle wrote the published CIFAR batches (str = BINSTRING, numpy.core)."""
    out = io.BytesIO()
    w = out.write

    def string(b):
        w(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v):
        w(b"J" + struct.pack("<i", v))

    w(b"\x80\x02}q\x00(")
    string(b"data")
    w(b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85")
    string(b"b")
    w(b"\x87R(K\x01")
    integer(data.shape[0])
    integer(data.shape[1])
    w(b"\x86cnumpy\ndtype\n")
    string(b"u1")
    w(b"K\x00K\x01\x87R(K\x03")
    string(b"|")
    w(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
    string(data.tobytes())
    w(b"tb")
    string(label_key)
    w(b"](")
    for value in labels:
        integer(int(value))
    w(b"e")
    string(b"batch_label")
    string(b"testing batch 1 of 1")
    w(b"u.")
    return out.getvalue()


def test_cifar_batches_are_md5_checked_and_unpickled_without_objects(tmp_path, rng, monkeypatch):
    import pickle

    from oodscope.data import cifar10

    assert cifar10.CIFAR_MD5["cifar-10-batches-py/data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        (folder / name).write_bytes(_py2_batch(data, [1, 2, 3], b"labels"))
        batches[name] = data
    # not the published files: refused before anything is unpickled
    with pytest.raises(ValueError, match=r"data_batch_1: md5 [0-9a-f]{32} is not the published c99cafc1"):
        cifar10.cifar10(tmp_path)
    md5 = {f"cifar-10-batches-py/{n}": hashlib.md5((folder / n).read_bytes()).hexdigest() for n in batches}
    monkeypatch.setattr(cifar10, "CIFAR_MD5", md5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy.core names of the published pickles load without warnings
        (train_x, train_y), (test_x, test_y) = cifar10.cifar10(tmp_path)
    assert train_x.shape == (15, 32, 32, 3) and train_y.tolist() == [1, 2, 3] * 5
    assert np.array_equal(test_x, batches["test_batch"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    # a planted batch with the expected md5 still runs nothing: the unpickler allows no class or function
    marker = tmp_path / "ran"
    for payload in (pickle.dumps({b"data": _Planted(marker)}), pickle.dumps(_Planted(marker), protocol=2),
                    pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0]})):
        (folder / "test_batch").write_bytes(payload)
        md5["cifar-10-batches-py/test_batch"] = hashlib.md5(payload).hexdigest()
        with pytest.raises(ValueError, match="test_batch: not a CIFAR python batch"):
            cifar10.cifar10(tmp_path)
        assert not marker.exists()
