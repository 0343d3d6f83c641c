"""NSA: a localisation network trained on natural synthetic anomalies (Poisson-blended patches of other images).

Schlüter, Tan, Hou & Kainz, "Natural Synthetic Anomalies for Self-Supervised Anomaly Detection and
Localization", ECCV 2022 (arXiv 2109.15222), with the settings of the authors' MVTec AD training script.

**Synthetic anomalies** (:func:`nsa_anomaly`, Sec. 3.1): up to ``num_patches`` (4 for textures; the first always,
each further one with probability 1/2) rectangular patches are cut from *another* normal image, rescaled and
blended into the destination at a random shifted position with Poisson image editing (OpenCV's
``cv2.seamlessClone``, ``NORMAL_CLONE``). Patch half-widths per axis are ``(0.03 + Gamma(2, 0.05)) * side``,
clipped to ``width_bounds`` = (0.03, 0.4) of the side; the patch is rescaled by ``clip(N(1, 0.5), 0.5, 2)``
(the texture bounds; sizes clipped to the same width bounds) keeping its aspect ratio. **Target** (Sec. 3.2,
"logistic intensity"): pixels whose mean absolute change exceeds ``tol`` (1 grey level) form the label mask
(median-filtered, 5 x 5); inside it the label is ``1 / (1 + exp(-k (d - x0)))`` with ``d`` the median-filtered
(11 x 11 square for the paper's disk of radius 5) mean absolute intensity difference in grey levels and
``(k, x0)`` = (1/3, 7), the paper's texture setting. So the target is in [0, 1], 0 outside the blended patches.

**Model and score.** A network that maps an image to a per-pixel anomaly probability, trained with binary
cross-entropy on the synthetic examples (half of each batch is left normal), Adam (``lr`` 1e-3, cosine to 1e-6).
The anomaly map is the network's output; the image score is the mean of the map (the image-level score of this
line of self-supervised localisation methods). Substitution, stated: the paper trains a ResNet-18
encoder-decoder from scratch for 320 epochs at 256 px (batch 64) on a GPU; here the encoder is the frozen
ImageNet EfficientNet-Lite0 of this package (stages 1-5, output stride 16) with a small trained U-Net decoder
(skip connections from the stride 2, 4 and 8 stages), at ``input_size`` 128 and ``steps`` 200 with batch 16
(measured: 100 steps of batch 8 took 175 s on 2 cores shared at load average ~17, so the default is roughly
ten minutes there); ``train_encoder=True`` fine-tunes the encoder as well.

OpenCV (``opencv-python-headless``, extra ``oodscope[imagead]``) is imported only when anomalies are generated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import ImageDetector, resolve_backbone

WIDTH_BOUNDS = (0.03, 0.4)
GAMMA_PARAMS = (2.0, 0.05, 0.03)  # shape, scale, offset of the half-width (fraction of the side)
RESIZE_BOUNDS = (0.5, 2.0)
LOGISTIC = (1 / 3, 7.0)


def _cv2():
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("nsa: synthetic anomalies use OpenCV's seamlessClone: "
                          "pip install 'oodscope[imagead]' (opencv-python-headless)") from error
    return cv2


def _one_patch(dest: np.ndarray, src: np.ndarray, rng: np.random.Generator, width_bounds, gamma_params,
               resize_bounds):
    """Blend one rescaled patch of ``src`` into ``dest`` (uint8 HxWx3); returns (image, box) or (dest, None)."""
    cv2 = _cv2()
    dims = np.array(dest.shape[:2])
    lo = np.round(width_bounds[0] * dims).astype(int)
    hi = np.round(width_bounds[1] * dims).astype(int)
    shape, scale, offset = gamma_params
    half = np.clip(((offset + rng.gamma(shape, scale, size=2)) * dims).astype(int), lo, hi)
    center = np.array([rng.integers(lo[i], max(dims[i] - lo[i], lo[i] + 1)) for i in range(2)])
    top, bottom = np.clip(center - half, 0, dims), np.clip(center + half, 0, dims)
    patch = src[top[0]:bottom[0], top[1]:bottom[1]]
    height, width = patch.shape[:2]
    if height < 3 or width < 3:
        return dest, None
    factor = float(np.clip(rng.normal(1.0, 0.5), *resize_bounds))
    new_h = int(np.clip(factor * height, lo[0], hi[0]))
    new_w = int(np.clip(int(new_h / height * width), lo[1], hi[1]))
    new_h = int(np.clip(int(new_w / width * height), lo[0], hi[0]))
    # OpenCV 5's seamlessClone asserts on masks under 5 pixels on a side (3 x 3 inside the zero border); no patch
    if new_h + 4 > dims[0] or new_w + 4 > dims[1] or new_h < 5 or new_w < 5:
        return dest, None
    patch = cv2.resize(patch, (new_w, new_h))
    # destination: a random shifted position where the patch fits
    cy = int(rng.integers(new_h // 2 + 1, dims[0] - new_h // 2 - 1))
    cx = int(rng.integers(new_w // 2 + 1, dims[1] - new_w // 2 - 1))
    y0, x0 = cy - new_h // 2, cx - new_w // 2
    mask = np.full((new_h, new_w), 255, np.uint8)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = 0, 0, 0, 0  # zero border avoids blending artefacts
    if int((mask > 0).sum()) < 50:  # seamlessClone fails on tiny masks
        return dest, None
    center_xy = (x0 + new_w - new_w // 2, y0 + new_h // 2)  # OpenCV's centre of the mask's bounding box
    out = cv2.seamlessClone(np.ascontiguousarray(patch), np.ascontiguousarray(dest), mask, center_xy,
                            cv2.NORMAL_CLONE)
    return out, (y0, y0 + new_h, x0, x0 + new_w)


def nsa_anomaly(dest: np.ndarray, src: np.ndarray, rng: np.random.Generator, num_patches: int = 4,
                width_bounds=WIDTH_BOUNDS, gamma_params=GAMMA_PARAMS, resize_bounds=RESIZE_BOUNDS,
                logistic=LOGISTIC, tol: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One NSA training example: ``dest`` with patches of ``src`` blended in, and its target in [0, 1].

    ``dest``, ``src``: uint8 ``(H, W, 3)`` images of the same size (grayscale copied to 3 channels is fine).
    Returns the uint8 image and a float32 ``(H, W)`` target (0 outside the changed patches). Deterministic for a
    given ``rng`` state. See the module docstring for the sampling and the logistic-intensity target.
    """
    cv2 = _cv2()
    if dest.shape != src.shape or dest.ndim != 3 or dest.shape[2] != 3 or dest.dtype != np.uint8:
        raise ValueError(f"nsa_anomaly: dest and src must be uint8 (H, W, 3) of one size, got {dest.shape} "
                         f"{dest.dtype} and {src.shape} {src.dtype}")
    image = dest.copy()
    region = np.zeros(dest.shape[:2], bool)
    for i in range(num_patches):
        if i == 0 or rng.integers(2):
            image, box = _one_patch(image, src, rng, width_bounds, gamma_params, resize_bounds)
            if box is not None:
                region[box[0]:box[1], box[2]:box[3]] = True
    diff = np.abs(image.astype(np.float32) - dest.astype(np.float32)).mean(axis=2) * region
    label_mask = cv2.medianBlur((diff > tol).astype(np.uint8), 5)
    smooth = cv2.medianBlur(np.clip(np.round(diff * label_mask), 0, 255).astype(np.uint8), 11).astype(np.float32)
    k, x0 = logistic
    target = label_mask / (1.0 + np.exp(-k * (smooth - x0)))
    return image, target.astype(np.float32)


class _Decoder(nn.Module):
    """U-Net style decoder over the Lite0 stages (strides 2, 4, 8, 16) to one output channel at full size."""

    def __init__(self, channels=(16, 24, 40, 112), width: int = 64):
        super().__init__()
        c1, c2, c3, c5 = channels

        def conv(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

        self.up3 = conv(c5 + c3, width)
        self.up2 = conv(width + c2, width // 2)
        self.up1 = conv(width // 2 + c1, width // 4)
        self.head = nn.Conv2d(width // 4, 1, 3, padding=1)

    def forward(self, f: dict[str, torch.Tensor], size) -> torch.Tensor:
        def up(x, ref):
            return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

        x = self.up3(torch.cat([up(f["stage5"], f["stage3"]), f["stage3"]], 1))
        x = self.up2(torch.cat([up(x, f["stage2"]), f["stage2"]], 1))
        x = self.up1(torch.cat([up(x, f["stage1"]), f["stage1"]], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)  # logits


LAYERS = ("stage1", "stage2", "stage3", "stage5")


class NSA(ImageDetector):
    """Localisation network trained on natural synthetic anomalies (see module docstring)."""

    name = "nsa"
    trains_network = True
    grid = {"steps": [200, 1000]}

    def __init__(self, backbone="efficientnet_lite0", input_size: int = 128, steps: int = 200,
                 batch_size: int = 16, lr: float = 1e-3, lr_min: float = 1e-6, num_patches: int = 4,
                 logistic_k: float = 1 / 3, logistic_x0: float = 7.0, train_encoder: bool = False,
                 decoder_width: int = 64, seed: int = 0, device: str = "cpu"):
        self.backbone = backbone
        self.input_size = input_size
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.lr_min = lr_min
        self.num_patches = num_patches
        self.logistic_k = logistic_k
        self.logistic_x0 = logistic_x0
        self.train_encoder = train_encoder
        self.decoder_width = decoder_width
        self.seed = seed
        self.device = device  # where the decoder and the feature network train and run

    def _check_params(self) -> None:
        for key in ("input_size", "steps", "batch_size", "num_patches", "decoder_width"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"nsa: {key} must be a positive integer, got {value!r}")
        if self.input_size < 32:
            raise ValueError(f"nsa: input_size must be >= 32 (patches need room), got {self.input_size}")
        if self.decoder_width < 4:
            raise ValueError(f"nsa: decoder_width must be >= 4, got {self.decoder_width}")
        if not 0 < self.lr_min <= self.lr:
            raise ValueError(f"nsa: need 0 < lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.logistic_k <= 0:
            raise ValueError(f"nsa: logistic_k must be > 0, got {self.logistic_k}")

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        features = self.backbone_.forward(small, LAYERS)
        return self.decoder_(features, x.shape[-2:])

    def _fit(self, images: np.ndarray) -> None:
        if len(images) < 2:
            raise ValueError(f"nsa: synthetic anomalies blend patches between images: need >= 2, got {len(images)}")
        from ..extraction.extract import resolve_device

        device = resolve_device(self.device)
        self.backbone_ = resolve_backbone(self.backbone, device=str(device))
        rng = np.random.default_rng(self.seed)
        small = F.interpolate(torch.from_numpy(images), size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        pool = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.decoder_ = _Decoder(width=self.decoder_width).to(device)
            params = list(self.decoder_.parameters())
            if self.train_encoder:
                for p in self.backbone_.model.parameters():
                    p.requires_grad_(True)
                params += list(self.backbone_.model.parameters())
                self.backbone_.model.train()
            optimiser = torch.optim.Adam(params, lr=self.lr)
            self.losses_ = np.empty(self.steps)
            batch = self.batch_size
            from tqdm.auto import tqdm

            bar = tqdm(range(self.steps), desc=self.name, unit="step", leave=False, disable=None)
            for step in bar:
                lr = self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * step / self.steps))
                for group in optimiser.param_groups:
                    group["lr"] = lr
                x, y = self.synthetic_batch(pool, batch, rng)
                loss = F.binary_cross_entropy_with_logits(self._logits(x.to(device)), y.to(device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                self.losses_[step] = loss.item()
                bar.set_postfix(loss=f"{self.losses_[step]:.4g}", refresh=False)
        self.decoder_.eval()
        self.backbone_.model.eval()
        for p in [*self.decoder_.parameters(), *self.backbone_.model.parameters()]:
            p.requires_grad_(False)

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        from ..extraction.extract import resolve_device

        super()._init_networks()
        self.decoder_ = _Decoder(width=self.decoder_width).to(resolve_device(self.device))

    def synthetic_batch(self, pool: np.ndarray, batch: int, rng: np.random.Generator):
        """``batch`` training pairs from uint8 ``(N, H, W, 3)`` normal images: half get NSA anomalies."""
        dest = rng.integers(len(pool), size=batch)
        src = (dest + rng.integers(1, len(pool), size=batch)) % len(pool)  # always another image
        images = pool[dest].copy()
        targets = np.zeros(images.shape[:3], np.float32)
        for i in range(batch // 2, batch):  # OpenCV blends one image at a time
            images[i], targets[i] = nsa_anomaly(pool[dest[i]], pool[src[i]], rng, self.num_patches,
                                                logistic=(self.logistic_k, self.logistic_x0))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.from_numpy(targets)[:, None]

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                x = torch.from_numpy(images[start:start + 32]).to(next(self.decoder_.parameters()).device)
                maps.append(torch.sigmoid(self._logits(x))[:, 0].cpu())
        maps_t = torch.cat(maps).double()
        return maps_t.mean(dim=(1, 2)).numpy(), maps_t.numpy()
