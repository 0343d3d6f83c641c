"""One tiny, fast case per registered detector of every family, for the contract and bad-input suites.

``case(name)`` returns ``Case(detector, train, test)``: a fresh detector with tiny settings (trained ones run a
few steps), its in-distribution training data and a test set whose last rows are planted outliers. New
detectors are covered without being listed: a detector with no entry in :data:`TINY` runs with its defaults on
the input kind its ``needs`` and ``family`` declare. Only detectors whose defaults are too slow, or that need a
named layer, have an entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

import oodscope
from oodscope.detectors import get
from oodscope.extraction.outputs import Need

N_OUTLIERS = 6  # the last rows of every test set are planted outliers


def detector_names() -> list[str]:
    """Every registered detector (the families with fit/score; training objectives are tested in test_training)."""
    from oodscope.detectors.registry import DETECTOR_FAMILIES

    return [name for name in oodscope.available() if get(name).family in DETECTOR_FAMILIES]


@dataclass
class Case:
    detector: Any
    train: Any
    test: Any


def _small_net_class():
    from torch import nn

    class SmallNet(nn.Module):
        """conv stem -> conv body -> global average pool -> linear head (3 classes)."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.pool(self.body(self.stem(x))).flatten(1))

    return SmallNet


def SmallNet():  # noqa: N802 - a class factory, so that importing this module imports no torch
    return _small_net_class()()


def _conv_net():
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SmallNet()


def _train(model, x: np.ndarray, y: np.ndarray, steps: int = 60):
    """A few seeded full-batch Adam steps, so that the head predicts every class (gram needs one per class)."""
    import torch

    from oodscope.data.transforms import ImageNormalize

    inputs = ImageNormalize(mean=[0.5] * 3, std=[0.25] * 3)(torch.from_numpy(x))
    targets = torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimiser.step()
    return model.eval()


@lru_cache(maxsize=None)
def image_outputs() -> tuple[Any, Any]:
    """Train/test outputs of a small random conv net on 8x8 images (logits, features, head, layers, model)."""
    from oodscope.data.transforms import ImageNormalize as Normalize

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (90, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 30)
    x[y == 1] //= 2
    x[y == 2] = 255 - x[y == 2] // 3
    test = np.concatenate([x[::6], np.full((N_OUTLIERS, 8, 8, 3), 255, np.uint8)])
    options = dict(preprocess=Normalize(mean=[0.5] * 3, std=[0.25] * 3), layers=["stem", "body"],
                   use_cache=False, progress=False, batch_size=32)
    model = _train(_conv_net(), x, y)
    train = oodscope.extract(model, (x, y), name="train", **options)
    test_out = oodscope.extract(model, test, name="test", **options)
    return train, test_out


@lru_cache(maxsize=None)
def gaussian_outputs() -> tuple[Any, Any]:
    """Class-clustered 16-d features with a linear head, 4 classes; the outliers belong to no class (centred noise:
    far from every class mean, near-uniform softmax)."""
    from oodscope import Head, Outputs

    rng = np.random.default_rng(0)
    means = np.eye(4, 16) * 4.0
    W, b = means / 4.0, np.zeros(4)

    def make(n, name, shift=0.0):
        y = rng.integers(0, 4, n)
        features = means[y] + rng.normal(size=(n, 16)) + shift
        return features, y

    f_train, y_train = make(200, "train")
    f_in, _ = make(24, "test")
    f_out = rng.normal(size=(N_OUTLIERS, 16)) * 0.5
    f_test = np.concatenate([f_in, f_out])
    train = Outputs(logits=f_train @ W.T + b, features=f_train, labels=y_train, head=Head(W, b), name="train")
    test = Outputs(logits=f_test @ W.T + b, features=f_test, head=Head(W, b), name="test")
    return train, test


@lru_cache(maxsize=None)
def probability_layer_outputs() -> tuple[Any, Any]:
    """The Gaussian case plus the probability layers that the DOS / MOS heads record: ``fc.absent_probability``
    (``N x 1``) and ``fc.others_probability`` (``N x 3`` groups); the planted outliers get high ones."""
    from oodscope import Outputs

    base_train, base_test = gaussian_outputs()
    rng = np.random.default_rng(4)

    def layers(n, outliers):
        absent = rng.uniform(0.0, 0.2, (n, 1))
        others = rng.uniform(0.9, 1.0, (n, 3))  # groups that do not claim the sample say "others"
        others[np.arange(n), rng.integers(0, 2, n)] = rng.uniform(0.0, 0.3, n)  # its own group (never the last)
        absent[n - outliers:] = rng.uniform(0.7, 1.0, (outliers, 1))
        others[n - outliers:] = rng.uniform(0.8, 1.0, (outliers, 3))
        return {"fc.absent_probability": absent, "fc.others_probability": others}

    train = Outputs(logits=base_train.logits, features=base_train.features, labels=base_train.labels,
                    head=base_train.head, layers=layers(len(base_train), 0), name="train")
    test = Outputs(logits=base_test.logits, features=base_test.features, head=base_test.head,
                   layers=layers(len(base_test), N_OUTLIERS), name="test")
    return train, test


@lru_cache(maxsize=None)
def generative_images() -> tuple[np.ndarray, np.ndarray]:
    """Smooth 8x8 uint8 images (a horizontal gradient with noise); the outliers are white noise, which no density
    model of smooth images finds likely."""
    rng = np.random.default_rng(5)

    def smooth(n):
        ramp = np.linspace(40, 200, 8)[None, None, :, None]
        return np.clip(ramp + rng.normal(0, 6, (n, 8, 8, 3)), 0, 255).astype(np.uint8)

    noise = rng.integers(0, 256, (N_OUTLIERS, 8, 8, 3), dtype=np.uint8)
    return smooth(48), np.concatenate([smooth(24), noise])


@lru_cache(maxsize=None)
def tabular_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    train = rng.normal(size=(120, 5))
    test = np.concatenate([rng.normal(size=(24, 5)), rng.normal(size=(N_OUTLIERS, 5)) + 6.0])
    return train, test


@lru_cache(maxsize=None)
def images() -> tuple[np.ndarray, np.ndarray]:
    """Defect-free 64x64 grey images (EfficientAD's smallest size); the outliers have a bright square pasted in."""
    rng = np.random.default_rng(3)
    train = np.clip(rng.normal(0.5, 0.05, (12, 1, 64, 64)), 0, 1).astype(np.float32)
    test = np.clip(rng.normal(0.5, 0.05, (12, 1, 64, 64)), 0, 1).astype(np.float32)
    test[-N_OUTLIERS:, 0, 16:40, 16:40] = 1.0
    return train, test


@lru_cache(maxsize=None)
def text_outputs() -> tuple[Any, Any]:
    """A tiny random BERT classifier's outputs on random token sequences (for the text detectors)."""
    import torch

    from conftest import tiny_bert_classifier

    model = tiny_bert_classifier()
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
        model.head.bias.normal_(generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(4)

    def tokens(n, low, high):
        out = np.zeros((n, 2, 7), np.int64)
        for i, k in enumerate(rng.integers(3, 8, n)):
            out[i, 0, :k] = np.r_[1, rng.integers(low, high, k - 2), 2]
            out[i, 1, :k] = 1
        return out

    train = oodscope.extract(model, (tokens(24, 3, 25), rng.integers(0, 3, 24)), name="train", use_cache=False,
                             progress=False)
    test = oodscope.extract(model, np.concatenate([tokens(12, 3, 25), tokens(N_OUTLIERS, 25, 50)]), name="test",
                            use_cache=False, progress=False)
    return train, test


@lru_cache(maxsize=None)
def tiny_clip():
    """A seeded random tiny Hugging Face CLIP (hidden 32, 2 layers, 32 x 32 images, patch 8), saved to a temporary
    folder and loaded back through oodscope.vlm.load_clip (one instance for the session; nothing mutates it)."""
    from vlm_models import tiny_clip as load

    return load()


@lru_cache(maxsize=None)
def vlm_data() -> tuple[list[str], np.ndarray]:
    """ID class names and 32 x 32 test images for the CLIP detectors; the outliers are white noise (with the random
    tiny CLIP, no ranking is expected: the suites check the contract and the errors)."""
    rng = np.random.default_rng(6)
    smooth = np.clip(rng.normal(0.5, 0.05, (12, 3, 32, 32)), 0, 1)
    noise = rng.random((N_OUTLIERS, 3, 32, 32))
    return ["apple", "leaf", "sky"], np.concatenate([smooth, noise]).astype(np.float32)


@lru_cache(maxsize=None)
def few_shot_data() -> tuple[tuple[list[str], np.ndarray, np.ndarray], np.ndarray]:
    """``(classes, images, labels)`` few-shot training data (4 per class, 32 x 32) for prompt learning, and the
    test images of :func:`vlm_data`."""
    classes, test = vlm_data()
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 4)
    images = np.clip(rng.normal(0.2 + 0.3 * labels[:, None, None, None], 0.05, (12, 3, 32, 32)), 0, 1)
    return (classes, images.astype(np.float32), labels), test


def _tiny_backbone():
    from oodscope.imagead import Backbone

    import torch

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(),
                                          torch.nn.Conv2d(16, 16, 3, 2, 1))
            self.l2 = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 3, 2, 1))

        def forward(self, x):
            return self.l2(self.l1(x))

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return Backbone(TinyNet())
    finally:
        torch.random.set_rng_state(state)


# tiny settings: only for detectors whose defaults are slow or that must be told a layer
TINY: dict[str, dict[str, Any]] = {
    "ae_apre_mss": {"epochs": 5},
    "ood_probability": {"layers": ("fc.absent_probability",)},  # any one-column probability layer
    "deep_sad": {"epochs": 3},
    "deep_svdd": {"epochs": 3},
    "drpo": {"epochs": 3, "n_projections": 50},
    "dte_c": {"epochs": 3, "hidden": (16, 16), "T": 50},
    "heat": {"n_iter": 3, "hidden_dim": 16, "n_hidden_layers": 1, "batch_size": 64, "sgld_steps": 2},
    "gram": {"layers": ["stem", "body"], "poles": [1, 2]},
    **{name: {"hidden": 8, "blocks": 1, "epochs": 2, "batch_size": 16} for name in
       ("pixelcnn_nll", "likelihood_ratio", "input_complexity", "typicality")},
    "hvae_llr": {"hidden": 8, "latent": 2, "epochs": 2, "batch_size": 16, "samples": 2},
    "msma": {"levels": 3, "n_components": 2, "hidden": 8, "blocks": 1, "epochs": 2, "batch_size": 16},
    "moodv2": {"detector_params": {"k": 3}, "width": 16, "depth": 1, "epochs": 2, "batch_size": 16},
    "lmd": {"attempts": 2, "mask_blocks": 4, "sampling_steps": 4, "hidden": 8, "epochs": 2, "batch_size": 16},
    "diffguard": {"ddim_steps": 5, "inversion_steps": 2, "hidden": 8, "epochs": 2, "batch_size": 16},
    "nl_invariants": {"layers": 2, "epochs": 2, "batch_size": 32},
    "flowcon": {"blocks": 2, "hidden": 8, "epochs": 2, "lr": 1e-3},
    "mahalanobis_ensemble": {"layers": ["stem", "body"]},
    "nac": {"layers": ["stem", "body"], "m_bins": 50, "o_star": 5},
    "rankfeat": {"layer": "body", "iterations": 5},
    "adascale": {"fit_samples": 60},
    "blood": {"n_estimators": 4},
    "ahm": {"fraction": 0.5, "k": 3},
    "sig_maha_knn": {},
    # image anomaly detectors: a small random backbone instead of EfficientNet, few training steps
    "patchcore": {"layers": ("l1", "l2"), "coreset_ratio": 0.5},
    "gaussian_ad": {"layers": ("l1", "l2")},
    "gaussian_ad_npca": {"layers": ("l1", "l2")},
    "efficientad": {"layers": ("l1", "l2"), "distill_steps": 2, "distill_batch_size": 2,
                    "distill_norm_batches": 1, "train_steps": 3, "generic_images": None},
    "cae": {"input_size": 128, "width": 0.125, "latent_dim": 8, "steps": 3, "batch_size": 4, "feature_size": 32},
    "nsa": {"input_size": 48, "steps": 3, "batch_size": 4, "decoder_width": 8},
    # vision-language detectors: the tiny random CLIP (added in case()), a small corpus for NegLabel
    "neglabel": {"corpus": ["bicycle", "cloud", "river", "table", "guitar", "mountain", "window", "bread",
                            "engine", "forest", "bridge", "candle", "garden", "helmet", "island", "ladder",
                            "mirror", "needle", "orange", "pencil", "rocket", "saddle", "tunnel", "violin"],
                 "n_negatives": 12, "n_groups": 3},
    "locoop": {"n_ctx": 4, "epochs": 2, "top_k": 1, "batch_size": 8},
    "clipn": {"n_prompts": 2, "epochs": 2, "batch_size": 8},
    "anomalyclip": {"n_ctx": 4, "depth": 2, "t_n_ctx": 2, "layers": (1, 2), "dpam_depth": 1, "epochs": 2,
                    "batch_size": 4},
    "clip_ad": {"stages": 2},  # the tiny CLIP has 2 vision blocks
    "clip_ad_plus": {"stages": 2, "epochs": 2, "batch_size": 4},
    "filo": {"object_name": "bottle", "layers": (1, 2), "dpam_depth": 1},
    "filo_trained": {"object_name": "bottle", "layers": (1, 2), "dpam_depth": 1, "n_ctx": 2, "epochs": 1,
                     "adapter_epochs": 1, "batch_size": 4},
}
TEXT = {"blood", "ahm"}
PROBABILITY_LAYERS = {"absent_class", "min_others", "ood_probability"}  # read a training head's probability layer
BACKBONE = {"patchcore", "gaussian_ad", "gaussian_ad_npca", "efficientad"}
CLIP = {"winclip", "winclip_plus", "anomalyclip", "clip_ad", "clip_ad_plus", "filo", "filo_trained"}  # image detectors on a CLIP model (the vlm family is added by family)
FEW_SHOT = {"locoop", "clipn"}  # CLIP prompt learning: fit((classes, images, labels))


def data_for(name: str) -> tuple[Any, Any]:
    cls = get(name)
    family = getattr(cls, "family", "ood")
    if name in FEW_SHOT:
        return few_shot_data()
    if family == "vlm":
        return vlm_data()
    if family == "image":
        return images()
    if family == "generative" and getattr(cls, "takes_images", False):
        return generative_images()
    if name in TEXT:
        return text_outputs()
    if name in PROBABILITY_LAYERS:
        return probability_layer_outputs()
    if family == "anomaly":
        return tabular_data()
    if cls.needs & {Need.MODEL, Need.LAYERS}:
        return image_outputs()
    return gaussian_outputs()


def case(name: str) -> Case:
    params = dict(TINY.get(name, {}))
    if name in BACKBONE:
        params["backbone"] = _tiny_backbone()
    if name in CLIP or get(name).family == "vlm":
        params["model"] = tiny_clip()
    if name == "diffguard":  # a seeded random conv net as the classifier (the CIFAR ResNet needs its weights)
        params["classifier"] = _conv_net()
    if name in ("anomalyclip", "clip_ad_plus", "filo_trained"):  # trained on a generated annotated auxiliary folder
        from vlm_models import tiny_mvtec_folder

        params["auxiliary"] = str(tiny_mvtec_folder())
    train, test = data_for(name)
    return Case(oodscope.create(name, **params), train, test)


def fitted(name: str) -> Case:
    c = case(name)
    c.detector.fit(c.train)
    return c
