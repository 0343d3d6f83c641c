"""The open_clip backbone (:class:`oodscope.vlm.backbone.OpenClip`) against open_clip's own forward passes, on a
seeded random tiny open_clip ``CLIP`` (no weights, no download). open_clip needs torchvision, which the CPU torch
of the test environment cannot load, so this file skips there; it runs where open_clip imports (the reference
environment of ``docs/performance.md``: ``pip install open_clip_torch``)."""

from __future__ import annotations

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

import oodscope  # noqa: E402
from oodscope.vlm.backbone import OpenClip  # noqa: E402

CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def tiny():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, width=32, heads=2, layers=2)).eval()
    return model, OpenClip(model, open_clip.get_tokenizer("ViT-B-32"))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((5, 3, 32, 32))


def test_open_clip_towers_equal_open_clips_own_encoders(tiny, images):
    model, clip = tiny
    pixels = clip.preprocess(torch.as_tensor(images, dtype=torch.float32))
    with torch.no_grad():
        expected_images = model.encode_image(pixels).numpy()
        expected_texts = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(CLASSES)).numpy()
        model.visual.output_tokens = True
        _, expected_tokens = model.visual(pixels)
        model.visual.output_tokens = False
    global_, patches = clip.encode_images(images)
    np.testing.assert_allclose(global_, expected_images, rtol=1e-5, atol=1e-6)
    assert patches.shape == (5, 16, 16)  # a 4 x 4 grid of 8-px patches, projected to the embedding size
    np.testing.assert_allclose(clip.encode_texts(CLASSES), expected_texts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clip.encode_tokens(images), expected_tokens.numpy(), rtol=1e-5, atol=1e-6)
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)


def test_mcm_on_the_open_clip_backbone_by_hand(tiny, images):
    model, clip = tiny
    mcm = oodscope.create("mcm", model=clip, temperature=1.0).fit(CLASSES)
    pixels = clip.preprocess(torch.as_tensor(images, dtype=torch.float32))
    with torch.no_grad():
        image = model.encode_image(pixels).double().numpy()
        texts = model.encode_text(open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {c}." for c in CLASSES]))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    texts = texts.double().numpy()
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    logits = image @ texts.T
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    expected = -(softmax / softmax.sum(1, keepdims=True)).max(1)
    np.testing.assert_allclose(mcm.score(images), expected, rtol=1e-5)
