"""DiffGuard: the semantic mismatch between an input and its diffusion synthesis guided by the predicted label.

Gao, Zhao, Hong & Xu, "DiffGuard: Semantic Mismatch-Guided Out-of-Distribution Detection using Pre-trained
Diffusion Models", ICCV 2023, Sec. 3-4: a classifier predicts the label ``y`` of the input ``x``; a diffusion
model maps ``x`` to a noised latent by DDIM inversion and synthesises an image back from it with classifier
guidance towards ``y``. An ID image already shows class ``y``, so the guided synthesis stays close to it; an OOD
image does not, and the synthesis drifts towards ``y``'s semantics, so the classifier sees a mismatch. As in the
authors' code (``ood_tester/guided_diffusion_model.py``, ``test_runner.py``, config ``exp6.1``):

* DDIM inversion of ``x`` over the first ``inversion_steps`` of a ``ddim_steps``-step DDIM chain (their
  ``early_stop_steps`` of ``timestep_respacing``; default 20 of 50, the ratio 100 of 250 of their GDM config), then
  DDIM sampling back to ``t = 0`` with ``x0_hat`` clipped (``clip_denoised``);
* guidance: the noise prediction becomes ``eps - sqrt(1 - abar_t) s grad log p(y | x_in)`` (Dhariwal & Nichol
  2021, Algorithm 2) with scale ``s = guidance_scale`` (their ``classifier_scale = 3``), the gradient taken at
  their blend ``x_in = f x0_hat + (1 - f) x_t``, ``f = sqrt(1 - abar_t)``, fed to the classifier in [0, 1];
* ``reference="unconditional"`` (their ``uncond_aux``, on in ``exp6.1``) compares the guided synthesis with the
  unguided one from the same latent; ``reference="input"`` with the input itself;
* the score is their ``logits`` distance, ``sum_k |f_k(reference) - f_k(synthesis)|`` on the classifier's logits
  (higher = more OOD; they negate it into an ID score).

Where this differs: the diffusion model is the small unconditional DDPM of :mod:`oodscope.generative.ddpm`
trained on the ID images (theirs: OpenAI's 256x256 guided-diffusion model or a latent diffusion model, both
pretrained on ImageNet), so DDIM runs 50 steps at 32x32; their test-time tricks beyond the above are left out: the
8 random cutouts averaged in the guidance gradient (``cutouts_num``; for 224-pixel ImageNet crops), the adaptive
early stop of the inversion (PSNR / DISTS thresholds) and the Grad-CAM masks of their latent-diffusion variant.

``classifier`` is a torch module mapping [0, 1] images ``(N, C, H, W)`` to logits, or the name of a CIFAR ResNet
of :mod:`oodscope.models.cifar_resnet` (e.g. ``"cifar10_resnet20"``, with ``weights`` a local state dict, else the
release file; the training mean/std normalisation is added in front). It stays frozen; a copy is kept in the
fitted detector. Left at ``None``, ``oodscope bench`` gives it the benchmark's classifier and its preprocessing
(:meth:`DiffGuard.use_classifier`); in library use it must be given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._diffusion import DiffusionDetector

REFERENCES = ("unconditional", "input")


def _on_unit_images(model, preprocess):
    """``model(preprocess(255 x))`` for [0, 1] ``NCHW`` images, ``preprocess`` taking the 0..255 batches a
    benchmark feeds it (``NHWC`` unless it says ``channels_last=False``); differentiable when it is torch ops."""
    from torch import nn

    channels_last = getattr(preprocess, "channels_last", True)

    class OnUnitImages(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.preprocess = preprocess

        def forward(self, x):
            if self.preprocess is None:
                return self.model(x)
            scaled = 255.0 * x
            return self.model(self.preprocess(scaled.permute(0, 2, 3, 1) if channels_last else scaled))

    return OnUnitImages()


def _normalised(model, mean, std):
    import torch
    from torch import nn

    class Normalised(nn.Module):
        """``model((x - mean) / std)`` on [0, 1] images."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return Normalised()


class DiffGuard(DiffusionDetector):
    """``score(x) = || f(reference(x)) - f(synthesis(x | y = argmax f(x))) ||_1`` on the classifier's logits."""

    name = "diffguard"

    def __init__(self, classifier: Any = None, weights: str | None = None,
                 guidance_scale: float = 3.0, ddim_steps: int = 50, inversion_steps: int = 20,
                 reference: str = "unconditional", hidden: int = 32, blocks: int = 1, diffusion_steps: int = 1000,
                 epochs: int = 3, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
        self.classifier = classifier
        self.weights = weights
        self.guidance_scale = guidance_scale
        self.ddim_steps = ddim_steps
        self.inversion_steps = inversion_steps
        self.reference = reference
        self.hidden = hidden
        self.blocks = blocks
        self.diffusion_steps = diffusion_steps
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._check_diffusion_params("ddim_steps", "inversion_steps")
        if self.reference not in REFERENCES:
            raise ValueError(f"{self.name}: reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if not (np.isfinite(float(self.guidance_scale)) and float(self.guidance_scale) >= 0):
            raise ValueError(f"{self.name}: guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.ddim_steps > self.diffusion_steps:
            raise ValueError(f"{self.name}: ddim_steps ({self.ddim_steps}) cannot exceed diffusion_steps "
                             f"({self.diffusion_steps})")
        if self.inversion_steps >= self.ddim_steps:
            raise ValueError(f"{self.name}: inversion_steps ({self.inversion_steps}) must be below ddim_steps "
                             f"({self.ddim_steps}); the inversion stops part-way up the chain")

    def _resolve_classifier(self):
        """The frozen classifier on [0, 1] images: a copy of the given module, or the named CIFAR ResNet."""
        import copy

        import torch

        if self.classifier is None:
            raise ValueError(f"{self.name}: needs classifier=: a torch module (logits from [0, 1] images) or a CIFAR "
                             "ResNet name such as 'cifar10_resnet20' (oodscope bench passes its own model)")
        if isinstance(self.classifier, torch.nn.Module):
            model = copy.deepcopy(self.classifier)
        elif isinstance(self.classifier, str):
            from ..models.cifar_resnet import NORMALISATION, load_cifar_resnet, parse_name

            dataset, _ = parse_name(self.classifier)
            model = _normalised(load_cifar_resnet(self.classifier, self.weights), *NORMALISATION[dataset])
        else:
            raise ValueError(f"{self.name}: classifier must be a torch module (logits from [0, 1] images) or a CIFAR "
                             f"ResNet name such as 'cifar10_resnet20', got {type(self.classifier).__name__}")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()

    def use_classifier(self, model, preprocess=None) -> "DiffGuard":
        """Take ``model`` (after ``preprocess`` of 0..255 image batches) as the classifier unless one was given."""
        if self.classifier is None:
            self.classifier = _on_unit_images(model, preprocess)
        return self

    def _fit(self, images: np.ndarray) -> None:
        import torch

        self.classifier_ = self._resolve_classifier()
        try:
            with torch.no_grad():
                probe = self.classifier_(torch.from_numpy(images[:2]).float() / 255.0)
        except RuntimeError as error:
            raise ValueError(f"{self.name}: the classifier fails on the training images of shape (C, H, W) = "
                             f"{images.shape[1:]} ({str(error).splitlines()[0]}); pass images the classifier "
                             "was trained on") from None
        if probe.ndim != 2 or probe.shape[0] != 2 or probe.shape[1] < 2:
            raise ValueError(f"{self.name}: the classifier must return (N, classes >= 2) logits for the images, got "
                             f"shape {tuple(probe.shape)}")
        self.n_classes_ = int(probe.shape[1])
        self._fit_network(images)

    def _init_networks(self) -> None:
        super()._init_networks()
        self.classifier_ = self._resolve_classifier()

    def synthesise(self, images: Any) -> dict[str, np.ndarray]:
        """For images (uint8 ``NHWC``/``NCHW`` or floats on the 1/255 grid): the predicted ``labels``, the guided
        ``synthesis`` and the ``reference`` (the unguided synthesis or the input), both float32 in [0, 1]."""
        from ..detectors.base import NotFittedError
        from .base import as_uint8_images

        if not hasattr(self, "network_"):
            raise NotFittedError(f"{self.name} is not fitted: call fit(train_images) first")
        parts = self._synthesise(as_uint8_images(images, f"{self.name}: images"))
        return {key: value for key, value in parts.items() if key != "logits"}

    def _synthesise(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch
        from tqdm.auto import tqdm

        from .ddpm import ddim_invert, ddim_sample, strided_timesteps, to_model_range

        network, target = self._network_on_device()
        classifier = self.classifier_.to(target)
        timesteps = strided_timesteps(int(self.ddim_steps), network.steps)[:int(self.inversion_steps) + 1]
        out: dict[str, list] = {"labels": [], "synthesis": [], "reference": [], "logits": []}
        with torch.no_grad():
            for begin in tqdm(range(0, len(images), 64), desc=self.name, leave=False, disable=None):
                chunk = to_model_range(torch.from_numpy(np.ascontiguousarray(images[begin:begin + 64]))).to(target)
                # every chunk runs at 64 rows (a short one filled with its first row, then cut): float32 kernels
                # round by batch shape, and a score must not depend on its batch
                x0 = torch.cat([chunk, chunk[:1].expand(64 - len(chunk), *chunk.shape[1:])]) if len(chunk) < 64 \
                    else chunk
                logits = classifier((x0 + 1) / 2)
                labels = logits.argmax(dim=1)
                latent = ddim_invert(network, x0, timesteps)
                guidance = self._guidance(network, classifier, labels) if self.guidance_scale > 0 else None
                guided = ddim_sample(network, latent, timesteps, guidance)
                guided_logits = classifier((guided + 1) / 2)
                if self.reference == "unconditional":
                    reference = ddim_sample(network, latent, timesteps)
                    reference_logits = classifier((reference + 1) / 2)
                else:
                    reference, reference_logits = x0, logits
                n = len(chunk)
                out["labels"].append(labels[:n].cpu().numpy())
                out["synthesis"].append(((guided[:n] + 1) / 2).float().cpu().numpy())
                out["reference"].append(((reference[:n] + 1) / 2).float().cpu().numpy())
                out["logits"].append((reference_logits - guided_logits)[:n].abs().sum(dim=1).double().cpu().numpy())
        return {key: np.concatenate(parts) for key, parts in out.items()}

    def _guidance(self, network, classifier, labels):
        """``s * grad log p(y | x_in)`` at DiffGuard's blend ``x_in = f x0_hat + (1 - f) x_t``,
        ``f = sqrt(1 - abar_t)``."""
        import math

        import torch

        from .ddpm import predict_x0

        scale = float(self.guidance_scale)

        def guidance(x_t, eps, t):
            abar = float(network.alphas_cumprod[t])
            blend = math.sqrt(1.0 - abar)
            with torch.enable_grad():
                x_in = (blend * predict_x0(x_t, eps, abar) + (1.0 - blend) * x_t).detach().requires_grad_(True)
                log_p = torch.log_softmax(classifier((x_in + 1) / 2), dim=1)
                chosen = log_p.gather(1, labels[:, None]).sum()
                (grad,) = torch.autograd.grad(chosen, x_in)
            return scale * grad

        return guidance

    def _score(self, images: np.ndarray) -> np.ndarray:
        return self._synthesise(images)["logits"]
