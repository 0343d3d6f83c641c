"""CIFAR ResNets (He et al. 2016, Sec. 4.2: 6n+2 layers, 16/32/64 channels) with the module names of chenyaofo's
``pytorch-cifar-models``, so their published state dicts load directly.

Names: ``cifar10_resnet20/32/44/56`` and ``cifar100_resnet20/32/44/56``. :func:`load_cifar_resnet` builds the
architecture, loads weights from a local file (``weights_only=True``) or, for real users, from the release URL
into the torch hub cache. A release file is checked against its full sha256 where :data:`RELEASE_SHA256` knows it;
the release names carry only an 8-hex (32-bit) prefix, which is checked always but guards against accidents, not
against a file made to match it (such a file still cannot run code: weights load with ``weights_only=True``).
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
# Full sha256 of the release files, pinned only once verified against a file whose digest starts with the
# published prefix. None is pinned yet: the checkpoints at hand (the shared data's cifar10_resnet*.pth) are
# re-saved copies of the same tensors, with other bytes (their sha256 start eb80202b, 4a8f68a8, fe235e59,
# 121838a9, not the release prefixes), so they cannot vouch for the release bytes.
RELEASE_SHA256: dict[str, str] = {}


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


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, prefix: str, full: str | None = None) -> Path:
    """Raise ``ValueError`` unless the file's sha256 is ``full`` (when given) and starts with ``prefix``."""
    path = Path(path)
    digest = file_sha256(path)
    if full is not None and digest != full.lower():
        raise ValueError(f"weights file {path}: sha256 {digest} is not the release's {full}; the file is corrupt "
                         f"or not the release (delete it to download again)")
    if not digest.startswith(prefix):
        raise ValueError(f"weights file {path}: sha256 {digest[:16]}... does not start with the "
                         f"published prefix {prefix}; the file is corrupt or not the release (delete it to "
                         f"download again)")
    return path


def check_sha256_prefix(path: str | Path, prefix: str) -> Path:
    """Raise ``ValueError`` unless the sha256 of the file at ``path`` starts with ``prefix``."""
    return check_sha256(path, prefix)


def release_weights(name: str) -> Path:
    """The release file of ``name`` in the torch hub cache (downloaded once), its sha256 checked (in full where
    :data:`RELEASE_SHA256` has it, else its published prefix). A download that fails the check is deleted."""
    parse_name(name)
    prefix, full = RELEASE_SHA256_PREFIX[name], RELEASE_SHA256.get(name)
    url = RELEASE.format(name=name, sha=prefix)
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".download")
        try:
            try:
                torch.hub.download_url_to_file(url, str(part), hash_prefix=prefix, progress=True)
            except RuntimeError as error:  # torch hub's prefix check
                raise ValueError(f"download of {url} failed its sha256 check ({error}); nothing was kept") from None
            check_sha256(part, prefix, full)
            part.replace(path)
        finally:
            part.unlink(missing_ok=True)
    return check_sha256(path, prefix, full)


def load_cifar_resnet(name: str, weights: str | Path | None = None) -> CifarResNet:
    """Build ``name`` and load its weights (local file, else the published release, sha256-prefix checked)."""
    from ..safeio import load_torch

    model = build_cifar_resnet(name)
    if weights is not None:
        state = load_torch(weights, "weights file")  # weights_only=True; names the file when unreadable
    else:
        state = load_torch(release_weights(name), f"release weights of {name}")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {weights or 'from the release'} are not a state dict (a mapping of names to "
                         f"tensors) but a {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"weights {weights or 'from the release'} do not fit model {name!r}: "
                         f"{str(error).splitlines()[0]}") from error
    return model.eval()
