"""A benchmark: ID train/val/test splits and named groups of OOD sets, all as raw model inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Split:
    """Raw inputs (array or torch ``Dataset``) and int64 labels (``-1`` for OOD samples)."""

    inputs: Any
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if hasattr(self.inputs, "__len__") and len(self.inputs) != len(self.labels):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Benchmark:
    """ID splits plus ``ood[group][dataset]`` sets; ``ood_val`` sets are for tuning only."""

    name: str
    train: Split
    val: Split
    test: Split
    ood: dict[str, dict[str, Split]]
    ood_val: dict[str, Split] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # dataset name -> file it was read from (specs)
    overlaps: dict[str, int] = field(default_factory=dict)  # OOD set -> images identical to ID images

    def __post_init__(self) -> None:
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            if len(split) == 0:
                raise ValueError(f"benchmark {self.name!r}: ID {split_name} split is empty")
            if (split.labels < 0).any():
                raise ValueError(f"benchmark {self.name!r}: ID {split_name} split has OOD labels (-1)")
        for group, sets in self.ood.items():
            for dataset, split in sets.items():
                if len(split) == 0:
                    raise ValueError(f"benchmark {self.name!r}: OOD set {group}/{dataset} is empty")

    def datasets(self) -> dict[str, Split]:
        """Every split by a unique name: ``train``, ``val``, ``test``, ``ood_val/<name>``, ``<group>/<name>``."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        named.update({f"ood_val/{n}": s for n, s in self.ood_val.items()})
        named.update({f"{g}/{n}": s for g, sets in self.ood.items() for n, s in sets.items()})
        return named
