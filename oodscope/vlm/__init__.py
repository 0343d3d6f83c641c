"""Vision-language OOD and anomaly detection on a CLIP interface (optional extra ``oodscope[vlm]``).

:mod:`oodscope.vlm.backbone` holds the CLIP backbone interface and its loaders; the detectors (MCM, GL-MCM,
NegLabel, LoCoOp, CLIPN: family ``vlm``; WinCLIP, WinCLIP+, AnomalyCLIP, CLIP-AD (SDP, SDP+), FiLo: family
``image``) are registered in the one detector registry.
"""

from .backbone import ClipBackbone, HFClip, OpenClip, download_clip, load_clip

__all__ = ["ClipBackbone", "HFClip", "OpenClip", "download_clip", "load_clip"]
