"""A small CNN for the 8 x 8 ``digits`` benchmark, trained deterministically in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.transforms import ImageNormalize


class DigitsCNN(nn.Module):
    """conv(32) - conv(64) - maxpool - fc(64) = penultimate features - ``fc`` head."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        )
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def digits_preprocess() -> ImageNormalize:
    """``N x 8 x 8`` arrays on the 0-16 scale to ``N x 1 x 8 x 8`` floats in [0, 1]."""
    return ImageNormalize(mean=[0.0], std=[1.0], channels_last=True, scale=16.0)


def train_digits_cnn(images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0,
                     epochs: int = 40, cache_path: Path | None = None) -> DigitsCNN:
    """Train with Adam (lr 1e-3, batch 64) from a fixed seed; reuse ``cache_path`` if it holds the weights."""
    model = DigitsCNN(n_classes)
    if cache_path is not None and cache_path.exists():
        try:
            model.load_state_dict(torch.load(cache_path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:
            cache_path.unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's global RNG is left as it was
        torch.manual_seed(seed)
        model = DigitsCNN(n_classes)
    preprocess = digits_preprocess()
    x, y = preprocess(torch.as_tensor(images)), torch.as_tensor(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(cache_path)
    return model
