"""Image anomaly-detection folders in the MVTec AD layout (also VisA converted to it, magnetic-tile, ...).

Bergmann et al., "MVTec AD - A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", CVPR 2019::

    ROOT/train/good/*.png                      defect-free training images
    ROOT/test/good/*.png                       defect-free test images
    ROOT/test/<defect>/<name>.png              defective test images, one folder per defect type
    ROOT/ground_truth/<defect>/<name>_mask.png pixel masks (defect where value > 127); ``<name>.png`` is accepted
                                               too (VisA's converted layout)

Images of any size, grayscale or with alpha are read as RGB (grayscale is copied to 3 channels), resized to
``size x size`` (bilinear, antialiased) and, with ``crop``, center-cropped to ``crop x crop``: the PatchCore /
anomalib evaluation transform is ``size=256, crop=224``; the default keeps the whole image (``crop=None``) so that
no defect near a border is cut away. Masks go through the same geometry with nearest-neighbour resizing.

Nothing is skipped silently: an empty ``train/good``, a mask whose size differs from its image, or a defect
folder with some masks missing raises ``ValueError`` naming the files. A defect type whose ``ground_truth``
folder is absent altogether has no masks: its pixel metrics are reported as missing (``None``), not as zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


@dataclass
class ImageSet:
    """Images ``(N, 3, H, W)`` float32 in [0, 1]; ``masks`` ``(N, H, W)`` bool or ``None`` where missing.

    ``labels``: 0 = normal, 1 = anomalous; ``defects``: the folder name of each image (``"good"`` for normal);
    ``has_mask``: per image, whether a ground-truth mask exists (normal images always have an all-zero one).
    """

    images: np.ndarray
    labels: np.ndarray
    defects: np.ndarray
    paths: list[str]
    masks: np.ndarray | None = None
    has_mask: np.ndarray | None = None
    name: str = "images"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ImageSet":
        index = np.asarray(index)
        pick = (lambda a: None if a is None else a[index])
        return ImageSet(self.images[index], self.labels[index], self.defects[index],
                        [self.paths[i] for i in np.arange(len(self))[index]], pick(self.masks),
                        pick(self.has_mask), self.name)

    @property
    def pixel_ready(self) -> bool:
        """True when every image has a mask, so pixel metrics can be computed."""
        return self.masks is not None and self.has_mask is not None and bool(self.has_mask.all())


@dataclass
class MVTecData:
    train: ImageSet
    test: ImageSet
    root: str
    notes: list[str] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted(set(self.test.defects.tolist()) - {GOOD})


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _geometry(size: int, crop: int | None):
    def apply(img, resample):
        img = img.resize((size, size), resample=resample)
        if crop is not None:
            left = (size - crop) // 2
            img = img.crop((left, left, left + crop, left + crop))
        return img
    return apply


def read_image(path: Path, size: int = 224, crop: int | None = None) -> np.ndarray:
    """One image as float32 ``(3, H, W)`` in [0, 1]; grayscale/alpha/palette images become RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img = _geometry(size, crop)(img, Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


def read_mask(path: Path, image_path: Path, size: int = 224, crop: int | None = None) -> np.ndarray:
    """A mask as bool ``(H, W)`` (defect where value > 127); its size must equal its image's."""
    from PIL import Image

    with Image.open(path) as mask, Image.open(image_path) as img:
        if mask.size != img.size:
            raise ValueError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                             f"{img.size[0]}x{img.size[1]}; masks must have their image's size")
        mask = mask.convert("L")
        mask = _geometry(size, crop)(mask, Image.Resampling.NEAREST)
        return np.asarray(mask) > 127


def _find_mask(gt_folder: Path, image: Path) -> Path | None:
    for stem in (f"{image.stem}_mask", image.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = gt_folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _check_sizes(size: int, crop: int | None) -> None:
    if not (isinstance(size, (int, np.integer)) and size >= 8):
        raise ValueError(f"image size must be an integer >= 8, got {size!r}")
    if crop is not None and not (isinstance(crop, (int, np.integer)) and 8 <= crop <= size):
        raise ValueError(f"crop must be an integer in [8, size={size}], got {crop!r}")


def load_images(paths: list[Path], size: int = 224, crop: int | None = None) -> np.ndarray:
    side = crop or size
    out = np.empty((len(paths), 3, side, side), dtype=np.float32)
    for i, path in enumerate(paths):  # decoding is per file by nature
        out[i] = read_image(path, size, crop)
    return out


def load_mvtec(root: str | Path, size: int = 224, crop: int | None = None, max_train: int | None = None,
               seed: int = 0) -> MVTecData:
    """Read an MVTec-layout folder (see the module docstring). ``max_train`` subsamples ``train/good``."""
    _check_sizes(size, crop)
    root = Path(root)
    train_dir, test_dir = root / "train" / GOOD, root / "test"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{root}: no train/good folder; expected the MVTec AD layout "
                                "(train/good, test/<defect>, ground_truth/<defect>)")
    train_paths = _images_in(train_dir)
    if not train_paths:
        raise ValueError(f"{train_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); anomaly detectors are "
                         "fitted on defect-free training images, add some")
    if max_train is not None and max_train < len(train_paths):
        pick = np.sort(np.random.default_rng(seed).choice(len(train_paths), max_train, replace=False))
        train_paths = [train_paths[i] for i in pick]
    if not test_dir.is_dir():
        raise FileNotFoundError(f"{root}: no test folder (test/good and test/<defect>)")
    folders = sorted(p for p in test_dir.iterdir() if p.is_dir())
    test_paths, defects, mask_paths, notes = [], [], [], []
    for folder in folders:
        images = _images_in(folder)
        if not images:
            raise ValueError(f"test folder {folder} holds no images; remove it or add images")
        test_paths += images
        defects += [folder.name] * len(images)
        if folder.name == GOOD:
            mask_paths += [None] * len(images)
            continue
        gt = root / "ground_truth" / folder.name
        if not gt.is_dir():
            notes.append(f"no ground_truth/{folder.name}: pixel metrics of '{folder.name}' are missing")
            mask_paths += [None] * len(images)
            continue
        found = [_find_mask(gt, image) for image in images]
        missing = [image.name for image, m in zip(images, found) if m is None]
        if missing:
            raise ValueError(f"{gt}: no mask for {len(missing)} of {len(images)} images of '{folder.name}' "
                             f"(e.g. {missing[:3]}); expected <name>_mask.png, or remove the folder to skip "
                             "pixel metrics for this defect type")
        mask_paths += found
    if not test_paths:
        raise ValueError(f"{test_dir} holds no image folders")
    if GOOD not in defects:
        notes.append("no test/good images: image AUROC needs normal test images")
    side = crop or size
    defects = np.array(defects)
    labels = (defects != GOOD).astype(np.int64)
    has_mask = np.array([d == GOOD or m is not None for d, m in zip(defects, mask_paths)])
    masks = np.zeros((len(test_paths), side, side), dtype=bool)
    for i, (mask, image) in enumerate(zip(mask_paths, test_paths)):
        if mask is not None:
            masks[i] = read_mask(mask, image, size, crop)
    empty = [str(test_paths[i].name) for i in np.flatnonzero(has_mask & (labels == 1) & ~masks.any(axis=(1, 2)))]
    if empty:
        notes.append(f"{len(empty)} defective images have an empty mask after resizing/cropping (e.g. {empty[:3]})")
    train = ImageSet(load_images(train_paths, size, crop), np.zeros(len(train_paths), np.int64),
                     np.array([GOOD] * len(train_paths)), [str(p) for p in train_paths], name="train")
    test = ImageSet(load_images(test_paths, size, crop), labels, defects, [str(p) for p in test_paths],
                    masks=masks if has_mask.any() else None, has_mask=has_mask, name="test")
    return MVTecData(train=train, test=test, root=str(root), notes=notes)
