"""Models by name for the CLI: ``--model NAME [--weights PATH]`` -> (model, preprocessing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def load_model(name: str, weights: str | Path | None = None) -> tuple[Any, Callable]:
    """A model of the zoo in eval mode and its input preprocessing (uint8 NHWC batches -> model input)."""
    from .cifar_resnet import RELEASE_SHA256_PREFIX, cifar_preprocess, load_cifar_resnet

    if name in RELEASE_SHA256_PREFIX:
        return load_cifar_resnet(name, weights), cifar_preprocess(name)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(available_models())}")


def available_models() -> list[str]:
    from .cifar_resnet import RELEASE_SHA256_PREFIX

    return sorted(RELEASE_SHA256_PREFIX)
