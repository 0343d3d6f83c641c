"""CIFAR ResNets (He et al. 2016, Sec. 4.2: 6n+2 layers, 16/32/64 channels) with the module names of chenyaofo's
``pytorch-cifar-models``, so their published state dicts load directly.

Names: ``cifar10_resnet20/32/44/56`` and ``cifar100_resnet20/32/44/56``. :func:`load_cifar_resnet` builds the
architecture, loads weights from a local file (``weights_only=True``) or, for real users, from the release URL
into the torch hub cache with a sha256-prefix check.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.transforms import ImageNormalize

DEPTH_BLOCKS = {20: 3, 32: 5, 44: 7, 56: 9}
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
RELEASE = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/{name}-{sha}.pt"
RELEASE_SHA256_PREFIX = {
    "cifar10_resnet20": "4118986f", "cifar10_resnet32": "ef93fc4d", "cifar10_resnet44": "2a3cabcb",
    "cifar10_resnet56": "187c023a", "cifar100_resnet20": "23dac2f1", "cifar100_resnet32": "84213ce6",
    "cifar100_resnet44": "ffe32858", "cifar100_resnet56": "f2eff4c8",
}


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class CifarResNet(nn.Module):
    """conv1-bn1-relu, layer1/2/3 of ``n`` BasicBlocks, global average pool (64-d features), ``fc`` head."""

    def __init__(self, blocks: int, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._layer(16, 16, blocks, 1)
        self.layer2 = self._layer(16, 32, blocks, 2)
        self.layer3 = self._layer(32, 64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, n_classes)

    @staticmethod
    def _layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def parse_name(name: str) -> tuple[str, int]:
    """``"cifar10_resnet20"`` -> ``("cifar10", 20)``; a clear error for unknown names."""
    dataset, _, arch = name.partition("_")
    depth = int(arch[len("resnet"):]) if arch.startswith("resnet") and arch[6:].isdigit() else None
    if dataset not in NORMALISATION or depth not in DEPTH_BLOCKS:
        known = ", ".join(sorted(RELEASE_SHA256_PREFIX))
        raise ValueError(f"unknown model {name!r}; known: {known}")
    return dataset, depth


def cifar_preprocess(name: str) -> ImageNormalize:
    """uint8 NHWC images -> normalised NCHW floats with the model's training mean/std."""
    mean, std = NORMALISATION[parse_name(name)[0]]
    return ImageNormalize(mean=mean, std=std)


def build_cifar_resnet(name: str) -> CifarResNet:
    dataset, depth = parse_name(name)
    return CifarResNet(DEPTH_BLOCKS[depth], n_classes=10 if dataset == "cifar10" else 100)


def check_sha256_prefix(path: str | Path, prefix: str) -> Path:
    """Raise ``ValueError`` unless the sha256 of the file at ``path`` starts with ``prefix``."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise ValueError(f"weights file {path}: sha256 {digest.hexdigest()[:16]}... does not start with the "
                         f"published prefix {prefix}; the file is corrupt or not the release (delete it to "
                         f"download again)")
    return path


def release_weights(name: str) -> Path:
    """The release file of ``name`` in the torch hub cache (downloaded once), its sha256 prefix checked."""
    parse_name(name)
    prefix = RELEASE_SHA256_PREFIX[name]
    url = RELEASE.format(name=name, sha=prefix)
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=True)
    return check_sha256_prefix(path, prefix)


def load_cifar_resnet(name: str, weights: str | Path | None = None) -> CifarResNet:
    """Build ``name`` and load its weights (local file, else the published release, sha256-prefix checked)."""
    model = build_cifar_resnet(name)
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = torch.load(release_weights(name), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"weights {weights or 'from the release'} do not fit model {name!r}: "
                         f"{str(error).splitlines()[0]}") from error
    return model.eval()
