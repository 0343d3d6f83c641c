"""Extraction: run a model once per dataset, cache what detectors consume.

``extract`` (which imports torch) is loaded on first use so that scoring plain arrays never imports torch.
"""

from .outputs import Head, ModelSource, Need, Outputs, as_outputs

__all__ = ["extract", "evaluation_mode", "resolve_device", "Head", "ModelSource", "Need", "Outputs", "as_outputs"]


def __getattr__(name: str):
    if name in ("extract", "evaluation_mode", "resolve_device"):
        from . import extract as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
