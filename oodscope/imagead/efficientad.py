"""EfficientAD: a distilled patch description network, student-teacher and autoencoder anomaly maps.

Batzner, Heckler & König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies",
WACV 2024 (EfficientAD-S; Algorithms 1-3 of the paper's appendix).

* **PDN-S** (Sec. 3.1): conv 4x4 (128) - ReLU - avgpool 2x2/2 - conv 4x4 (256) - ReLU - avgpool 2x2/2 - conv 3x3
  (256) - ReLU - conv 4x4 (384); a 33 x 33 receptive field per output vector. At test time without padding: a
  ``H x W`` image gives a ``(H - 32)/4 x (W - 32)/4`` map (56 x 56 at the paper's 256 px).
* **Teacher pretraining** (Alg. 3): the PDN (with padding, output ``H/4``) is distilled by mean squared error
  into channel-normalised features of a pretrained backbone that sees the image at twice the resolution: PatchCore's
  locally aware features of two mid-level layers (3 x 3 neighbourhoods unfolded, the deeper layer resized to the
  first, each layer's vector averaged down to 1024 values, the concatenation averaged down to 384). The paper uses
  WideResNet-101 (``layer2``, ``layer3``) on ImageNet; **here** EfficientNet-Lite0's ``stage3`` and ``stage5``
  (strides 8 and 16, the PatchCore layers of this package), distilled on the training images mixed half and half
  with random crops of scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``) standing in for ImageNet,
  grayscale with probability 0.1 as in the paper. The target's channel mean and standard deviation come from the
  first ``distill_norm_batches`` batches (the paper: 10,000 ImageNet images).
* **Student-teacher** (Alg. 1): the student is a PDN-S with 768 output channels; the first 384 predict the
  (frozen, channel-normalised) teacher. Hard-feature loss: ``D = (T(I) - S(I))^2`` element-wise, ``d_hard`` its
  ``p_hard = 0.999`` quantile, ``L_hard = mean(D[D >= d_hard])`` (Eq. 1). Penalty ``L_ST = L_hard + (1 / (C H W))
  sum_c ||S(P)_c||_F^2`` on a pretraining image ``P`` (the paper: ImageNet, grayscale with probability 0.3); here a
  random crop of the sample photos (``generic_images="sample_photos"``) or no penalty (``None``).
* **Autoencoder** (Sec. 3.3, logical anomalies): encoder 5 x (conv 4x4 stride 2) + a conv collapsing the rest to
  1 x 1 x 64 (8 x 8 at 256 px), decoder 6 x (bilinear upsampling - conv 4x4 - ReLU - dropout 0.2), an upsampling to
  the PDN output size and two 3 x 3 convs (the paper's sizes 3, 8, 15, 32, 63, 127, 56 at 256 px, scaled with the
  input here). It sees an augmented image (brightness, contrast or saturation by a factor in [0.8, 1.2]) and
  regresses the teacher: ``L_AE = mean (T(I') - A(I'))^2``; the student's last 384 channels regress the
  autoencoder: ``L_STAE = mean (A(I') - S'(I'))^2``. Loss ``L_ST + L_AE + L_STAE``, Adam (lr 1e-4, weight decay
  1e-5), batch size 1, learning rate x 0.1 after 95 % of the steps.
* **Maps** (Sec. 3.4): ``M_ST = mean_c (T - S)^2``, ``M_AE = mean_c (A - S')^2``; each is normalised linearly so
  that its ``q_a = 0.9`` quantile on held-out validation images (``validation_fraction`` 0.1 of the training
  images, not used for training) maps to 0 and its ``q_b = 0.995`` quantile to 0.1; the combined map is
  ``0.5 M_ST + 0.5 M_AE``, zero-padded by 4 and bilinearly resized to the image; the image score is its maximum.

**Schedule.** The paper distils the teacher for 60,000 steps (batch 16, Adam lr 1e-4, weight decay 1e-5) and
trains student and autoencoder for 70,000 steps (batch 1) on a GPU, at 256 x 256 px. On two CPU cores one
PDN-S forward + backward costs about 1 s at 256 px, so the defaults here are a reduced schedule
(``distill_steps`` and ``train_steps``) that finishes in about 10 minutes at 160 px; pass the paper's numbers on a
GPU (``device="cuda"``). The detector works at the resolution it is given (``load_mvtec(size=256)`` for the
paper's); images must be at least 64 px per side.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import IMAGENET_MEAN, IMAGENET_STD, ImageDetector, resolve_backbone

GENERIC_IMAGES = ("sample_photos", None)
MIN_SIZE = 64
MAP_PAD = 4  # the no-padding PDN loses 32 px = 8 map cells; 4 on each side restore H/4


def pdn_small(out_channels: int = 384, padding: bool = False) -> nn.Sequential:
    """PDN-S (the paper's Table 6); ``padding`` as in teacher pretraining (output ``H/4``)."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4))


def pdn_output_size(size: tuple[int, int]) -> tuple[int, int]:
    """Output size of the no-padding PDN-S for an input of ``size`` (56 x 56 for 256 x 256)."""
    out = []
    for s in size:
        s = (s - 3) // 2  # conv 4, avgpool 2/2
        s = (s - 3) // 2  # conv 4, avgpool 2/2
        out.append(s - 2 - 3)  # conv 3, conv 4
    return out[0], out[1]


class AutoEncoder(nn.Module):
    """The EfficientAD autoencoder (paper's Table 7), its spatial sizes scaled with the input size."""

    # decoder upsampling sizes (size / divisor - offset): 3, 8, 15, 32, 63, 127 at 256 px
    UPSAMPLE = ((64, 1), (32, 0), (16, 1), (8, 0), (4, 1), (2, 1))

    def __init__(self, out_channels: int, size: tuple[int, int], out_size: tuple[int, int], dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (32, 32, 64, 64, 64):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            c_in = c
        layers.append(nn.Conv2d(64, 64, (size[0] // 32, size[1] // 32)))  # 8 x 8 -> 1 x 1 at 256 px
        self.encoder = nn.Sequential(*layers)
        self.sizes = [tuple(max(int(s / d) - o, 1) for s in size) for d, o in self.UPSAMPLE] + [tuple(out_size)]
        self.up_convs = nn.ModuleList(nn.Conv2d(64, 64, 4, padding=2) for _ in self.UPSAMPLE)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for size, conv in zip(self.sizes, self.up_convs):
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
            h = self.dropout(F.relu(conv(h)))
        h = F.interpolate(h, size=self.sizes[-1], mode="bilinear", align_corners=False)
        return self.head(h)


# -- loss pieces -----------------------------------------------------------------------------------------------
def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``q`` quantile of all elements with linear interpolation (``torch.quantile`` / ``np.quantile``'s default),
    through ``kthvalue`` so that it has no size limit."""
    flat = x.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo = int(np.floor(pos))
    low = torch.kthvalue(flat, lo + 1).values
    if lo + 1 >= flat.numel():
        return low
    high = torch.kthvalue(flat, lo + 2).values
    return low + (pos - lo) * (high - low)


def hard_feature_loss(distance: torch.Tensor, p_hard: float = 0.999) -> torch.Tensor:
    """Eq. (1): mean of the squared differences at or above their ``p_hard`` quantile ``d_hard``."""
    d_hard = quantile(distance.detach(), p_hard)
    return distance[distance >= d_hard].mean()


def map_quantiles(maps: np.ndarray, q_a: float = 0.9, q_b: float = 0.995) -> tuple[float, float]:
    """The ``q_a`` and ``q_b`` quantiles of all values of the validation maps (Sec. 3.4)."""
    values = np.asarray(maps, dtype=np.float64).ravel()
    return float(np.quantile(values, q_a)), float(np.quantile(values, q_b))


def normalise_map(maps: np.ndarray, quantiles: tuple[float, float]) -> np.ndarray:
    """Linear map sending the ``q_a`` quantile to 0 and the ``q_b`` quantile to 0.1."""
    a, b = quantiles
    return 0.1 * (maps - a) / max(b - a, np.finfo(np.float64).tiny)


# -- data helpers (vectorised over the batch) -------------------------------------------------------------------
def sample_photos() -> torch.Tensor:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg) as ``(2, 3, 427, 640)`` float in [0, 1]."""
    from sklearn.datasets import load_sample_images

    photos = np.stack(load_sample_images().images).astype(np.float32) / 255.0
    return torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()


def random_crops(photos: torch.Tensor, n: int, size: tuple[int, int], rng: np.random.Generator,
                 min_scale: float = 0.25) -> torch.Tensor:
    """``n`` random crops (side ``min_scale``-1 of the photo's height, random position and horizontal flip),
    resized bilinearly to ``size`` with one ``grid_sample``."""
    _, _, ph, pw = photos.shape
    which = rng.integers(len(photos), size=n)
    side = rng.uniform(min_scale, 1.0, size=n) * min(ph, pw)
    sy, sx = side / ph, side / pw * (size[1] / size[0])
    sx = np.minimum(sx, 1.0)
    ty = rng.uniform(-1 + sy, 1 - sy)
    tx = rng.uniform(-1 + sx, 1 - sx)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(torch.from_numpy(theta), [n, 3, *size], align_corners=False)
    return F.grid_sample(photos[torch.from_numpy(which)], grid, mode="bilinear", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def random_grayscale(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    pick = torch.from_numpy(rng.random(len(x)) < p).view(-1, 1, 1, 1)
    return torch.where(pick, _gray(x).expand_as(x), x)


def ae_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One of brightness, contrast, saturation per image, factor uniform in [0.8, 1.2] (torchvision's rules)."""
    kind = torch.from_numpy(rng.integers(3, size=len(x))).view(-1, 1, 1, 1)
    f = torch.from_numpy(rng.uniform(0.8, 1.2, size=len(x)).astype(np.float32)).view(-1, 1, 1, 1)
    gray = _gray(x)
    brightness = x * f
    contrast = f * x + (1 - f) * gray.mean(dim=(2, 3), keepdim=True)
    saturation = f * x + (1 - f) * gray
    out = torch.where(kind == 0, brightness, torch.where(kind == 1, contrast, saturation))
    return out.clamp(0.0, 1.0)


def _mean_mapper(n_in: int, n_out: int) -> torch.Tensor:
    """The ``(n_in, n_out)`` matrix of 1-D adaptive average pooling from ``n_in`` to ``n_out`` values."""
    return F.adaptive_avg_pool1d(torch.eye(n_in)[:, None], n_out)[:, 0]


def patch_embedding(features: dict[str, torch.Tensor], layers: Sequence[str], out_channels: int,
                    layer_dim: int = 1024) -> torch.Tensor:
    """PatchCore's locally aware features reduced to ``out_channels`` (the distillation target of Alg. 3).

    Per layer, each 3 x 3 neighbourhood (``C * 9`` values) is average-pooled to ``layer_dim`` values, the layers
    are concatenated and pooled to ``out_channels``, the deeper layers resized (bilinear) to the first layer's
    grid. All of that is linear, so it runs as one ``(C * 9, out_channels)`` matrix per layer, applied on the
    layer's own grid before resizing.
    """
    first = features[layers[0]]
    n, size = len(first), first.shape[-2:]
    final = _mean_mapper(layer_dim * len(layers), out_channels)
    out = 0
    for i, name in enumerate(layers):
        f = features[name]
        c, fh, fw = f.shape[1:]
        weight = _mean_mapper(c * 9, layer_dim) @ final[i * layer_dim:(i + 1) * layer_dim]
        u = F.unfold(f, 3, padding=1)  # (n, c * 9, fh * fw), channel-major like PatchCore's patches
        e = torch.einsum("nkp,ko->nop", u, weight.to(u.device)).reshape(n, out_channels, fh, fw)
        if (fh, fw) != tuple(size):
            e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
        out = out + e
    return out


class EfficientAD(ImageDetector):
    """Student-teacher + autoencoder anomaly maps with a distilled PDN teacher (see module docstring)."""

    name = "efficientad"
    trains_network = True
    grid = {"train_steps": [500, 2000], "generic_images": ["sample_photos", None]}

    def __init__(self, backbone="efficientnet_lite0", layers: Sequence[str] = ("stage3", "stage5"),
                 out_channels: int = 384, distill_steps: int = 40, distill_batch_size: int = 8,
                 distill_norm_batches: int = 4, train_steps: int = 250, lr: float = 1e-4,
                 weight_decay: float = 1e-5, p_hard: float = 0.999, generic_images: str | None = "sample_photos",
                 q_a: float = 0.9, q_b: float = 0.995, validation_fraction: float = 0.1, seed: int = 0,
                 device: str = "cpu", batch_size: int = 16):
        self.backbone = backbone
        self.layers = layers
        self.out_channels = out_channels
        self.distill_steps = distill_steps
        self.distill_batch_size = distill_batch_size
        self.distill_norm_batches = distill_norm_batches
        self.train_steps = train_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.p_hard = p_hard
        self.generic_images = generic_images
        self.q_a = q_a
        self.q_b = q_b
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.device = device
        self.batch_size = batch_size

    def _check_params(self) -> None:
        for key in ("out_channels", "distill_batch_size", "distill_norm_batches", "batch_size"):
            value = getattr(self, key)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"efficientad: {key} must be a positive integer, got {value!r}")
        for key in ("distill_steps", "train_steps"):
            value = getattr(self, key)
            if not (isinstance(value, (int, np.integer)) and value >= 0):
                raise ValueError(f"efficientad: {key} must be an integer >= 0, got {value!r} "
                                 "(the paper: distill_steps=60000, train_steps=70000)")
        if len(self.layers) < 1:
            raise ValueError("efficientad: give at least one backbone layer to distil the teacher from")
        if not 0.0 < self.p_hard < 1.0:
            raise ValueError(f"efficientad: p_hard must be in (0, 1), got {self.p_hard} (the paper: 0.999)")
        if not 0.0 <= self.q_a < self.q_b <= 1.0:
            raise ValueError(f"efficientad: need 0 <= q_a < q_b <= 1, got q_a={self.q_a}, q_b={self.q_b}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"efficientad: validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.generic_images not in GENERIC_IMAGES:
            raise ValueError(f"efficientad: generic_images must be one of {GENERIC_IMAGES}, "
                             f"got {self.generic_images!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"efficientad: need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    # -- helpers -----------------------------------------------------------------------------------------------
    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` images normalised with the ImageNet mean and std, as the teacher, student and autoencoder
        take them."""
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _to(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(self.device_)

    def _distil_teacher(self, train: np.ndarray, photos: torch.Tensor | None, rng: np.random.Generator
                        ) -> tuple[nn.Module, list[float]]:
        """Alg. 3: the padded PDN regresses channel-normalised backbone patch features of the 2x image."""
        backbone = resolve_backbone(self.backbone, device=str(self.device_))
        size = train.shape[2:]
        out_size = (size[0] // 4, size[1] // 4)

        def batch() -> torch.Tensor:
            k = self.distill_batch_size
            k_photo = k // 2 if photos is not None else 0
            x = torch.from_numpy(train[rng.integers(len(train), size=k - k_photo)])
            if k_photo:
                x = torch.cat([x, random_crops(photos, k_photo, size, rng)])
            return random_grayscale(x, 0.1, rng)

        def target(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                big = F.interpolate(x, size=(2 * size[0], 2 * size[1]), mode="bilinear", align_corners=False)
                emb = patch_embedding(backbone.forward(big, self.layers), self.layers, self.out_channels)
                if emb.shape[-2:] != out_size:
                    emb = F.interpolate(emb, size=out_size, mode="bilinear", align_corners=False)
            return emb

        stats = [target(batch()) for _ in range(self.distill_norm_batches)]
        mean = torch.stack([s.mean(dim=(0, 2, 3)) for s in stats]).mean(0).view(1, -1, 1, 1)
        var = torch.stack([((s - mean) ** 2).mean(dim=(0, 2, 3)) for s in stats]).mean(0).view(1, -1, 1, 1)
        std = var.sqrt().clamp_min(1e-6)
        teacher = pdn_small(self.out_channels, padding=True).to(self.device_)
        optimizer = torch.optim.Adam(teacher.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        losses = []
        for _ in range(self.distill_steps):
            x = batch().to(self.device_)
            y = (target(x) - mean) / std
            loss = ((teacher(self.normalise_input(x)) - y) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        frozen = pdn_small(self.out_channels, padding=False).to(self.device_)
        frozen.load_state_dict(teacher.state_dict())
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen.eval(), losses

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's output standardised per channel with the training images' mean and std (the paper's
        normalised teacher)."""
        return (self.teacher_(self.normalise_input(x)) - self.teacher_mean_) / self.teacher_std_

    def raw_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unnormalised ``M_ST`` and ``M_AE`` (PDN output size) of every image, in batches."""
        c = self.out_channels
        st, ae = [], []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = self._to(images[start:start + self.batch_size])
                t = self.teacher_features(x)
                s = self.student_(self.normalise_input(x))
                a = self.autoencoder_(self.normalise_input(x))
                st.append(((t - s[:, :c]) ** 2).mean(1).double().cpu().numpy())
                ae.append(((a - s[:, c:]) ** 2).mean(1).double().cpu().numpy())
        return np.concatenate(st), np.concatenate(ae)

    # -- fit / predict -----------------------------------------------------------------------------------------
    def _fit(self, images: np.ndarray) -> None:
        h, w = images.shape[2:]
        if min(h, w) < MIN_SIZE:
            raise ValueError(f"efficientad: images are {h} x {w} px; the PDN and autoencoder need at least "
                             f"{MIN_SIZE} px per side (the paper uses 256): load them with load_mvtec(size=256)")
        n_val = int(round(self.validation_fraction * len(images)))
        if n_val < 1 or len(images) - n_val < 1:
            raise ValueError(f"efficientad: {len(images)} training images cannot be split into training and "
                             f"validation images (validation_fraction={self.validation_fraction}); give more images")
        from ..extraction.extract import resolve_device

        self.device_ = resolve_device(self.device)  # a clear error for a device this machine does not have
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(images))
        val, train = images[np.sort(order[:n_val])], images[np.sort(order[n_val:])]
        photos = sample_photos() if self.generic_images == "sample_photos" else None
        c = self.out_channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.teacher_, self.distill_losses_ = self._distil_teacher(train, photos, rng)
            # teacher channel statistics on the training images (Alg. 1, lines 1-3)
            self.teacher_mean_ = torch.zeros(1, c, 1, 1, device=self.device_)
            self.teacher_std_ = torch.ones(1, c, 1, 1, device=self.device_)
            outs = []
            with torch.no_grad():
                for start in range(0, len(train), self.batch_size):
                    outs.append(self.teacher_features(self._to(train[start:start + self.batch_size])).double())
            outs = torch.cat(outs)
            mean = outs.mean(dim=(0, 2, 3), keepdim=True)
            std = ((outs - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
            self.teacher_mean_, self.teacher_std_ = mean.float(), std.float()
            del outs
            self.student_ = pdn_small(2 * c).to(self.device_)
            self.autoencoder_ = AutoEncoder(c, (h, w), pdn_output_size((h, w))).to(self.device_)
            self.train_losses_ = self._train(train, photos, rng)
            self.student_.eval()
            self.autoencoder_.eval()
        map_st, map_ae = self.raw_maps(val)
        self.quantiles_st_ = map_quantiles(map_st, self.q_a, self.q_b)
        self.quantiles_ae_ = map_quantiles(map_ae, self.q_a, self.q_b)
        self.n_validation_ = n_val

    def _init_networks(self) -> None:
        """Re-create the networks (architecture only) for :func:`oodscope.persistence.load`."""
        c, (h, w) = self.out_channels, self.input_dims_["image"][1:]
        self.teacher_ = pdn_small(c, padding=False).to(self.device_)
        self.student_ = pdn_small(2 * c).to(self.device_)
        self.autoencoder_ = AutoEncoder(c, (h, w), pdn_output_size((h, w))).to(self.device_)

    def _train(self, train: np.ndarray, photos: torch.Tensor | None, rng: np.random.Generator) -> np.ndarray:
        """Alg. 1: student (hard-feature loss + penalty) and autoencoder trained jointly, batch size 1."""
        c, size = self.out_channels, train.shape[2:]
        student, ae = self.student_.train(), self.autoencoder_.train()
        optimizer = torch.optim.Adam(itertools.chain(student.parameters(), ae.parameters()), lr=self.lr,
                                     weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(int(0.95 * self.train_steps), 1),
                                                    gamma=0.1)
        order = np.concatenate([rng.permutation(len(train)) for _ in range(-(-self.train_steps // len(train)))]
                               ) if self.train_steps else np.empty(0, dtype=int)
        losses = np.zeros((self.train_steps, 4))  # hard, penalty, ae, stae
        from tqdm.auto import tqdm

        for step in tqdm(range(self.train_steps), desc=self.name, unit="step", leave=False, disable=None):
            x = torch.from_numpy(train[order[step]:order[step] + 1])
            x_ae = ae_augment(x, rng)
            batch = [x, x_ae]
            if photos is not None:
                batch.append(random_grayscale(random_crops(photos, 1, size, rng), 0.3, rng))
            batch = self._to(torch.cat(batch))
            with torch.no_grad():
                t = self.teacher_features(batch[:2])
            s = student(self.normalise_input(batch))  # the image, its augmented copy and the penalty image in one pass
            loss_hard = hard_feature_loss((t[:1] - s[:1, :c]) ** 2, self.p_hard)
            loss_penalty = (s[2:, :c] ** 2).mean() if photos is not None else torch.zeros((), device=s.device)
            a = ae(self.normalise_input(batch[1:2]))
            loss_ae = ((t[1:2] - a) ** 2).mean()
            loss_stae = ((a - s[1:2, c:]) ** 2).mean()
            loss = loss_hard + loss_penalty + loss_ae + loss_stae
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses[step] = torch.stack([loss_hard, loss_penalty, loss_ae, loss_stae]).detach().cpu().numpy()
        return losses

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        map_st, map_ae = self.raw_maps(images)
        combined = 0.5 * normalise_map(map_st, self.quantiles_st_) + 0.5 * normalise_map(map_ae, self.quantiles_ae_)
        scores = combined.reshape(len(images), -1).max(axis=1)
        maps = F.pad(torch.from_numpy(combined)[:, None], (MAP_PAD,) * 4)
        maps = F.interpolate(maps, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        return scores, maps.numpy()
