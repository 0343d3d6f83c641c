"""The open_clip backbone (:class:`oodscope.vlm.backbone.OpenClip`) against open_clip's own forward passes, on a
seeded random tiny open_clip ``CLIP`` (no weights, no download). open_clip needs torchvision, which the CPU torch
of the test environment cannot load, so this file skips there; it runs where open_clip imports (the reference
environment of ``docs/performance.md``: ``pip install open_clip_torch``). The dual paths of CLIP-AD / FiLo on
open_clip's blocks are checked against open_clip's own hidden states and numpy."""

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


def _vv_by_hand(block, h, heads):
    """A block's V-V attention output on the hidden state ``h``, in numpy from its packed ``in_proj`` weights."""
    w = {k: v.double().numpy() for k, v in block.state_dict().items()}
    h = h.double().numpy()
    x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * w["ln_1.weight"] + w["ln_1.bias"]
    width = h.shape[-1]
    v = x @ w["attn.in_proj_weight"][2 * width:].T + w["attn.in_proj_bias"][2 * width:]
    vh = v.reshape(len(v), v.shape[1], heads, -1).transpose(0, 2, 1, 3)
    z = vh @ vh.transpose(0, 1, 3, 2) * vh.shape[-1] ** -0.5
    attention = np.exp(z - z.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    out = (attention @ vh).transpose(0, 2, 1, 3).reshape(v.shape)
    return out @ w["attn.out_proj.weight"].T + w["attn.out_proj.bias"]


def test_the_dual_paths_on_open_clip_blocks_by_hand(tiny, images):
    """CLIP's own path through the written-out blocks equals open_clip's blocks, and each block's V-V output
    equals numpy from its packed weights: what CLIP-AD's SDP and FiLo run on."""
    from oodscope.vlm.anomalyclip import dual_path_tokens
    from oodscope.vlm.clip_ad import staged_dual_path

    model, clip = tiny
    pixels = clip.preprocess(torch.as_tensor(images, dtype=torch.float32))
    resblocks = model.visual.transformer.resblocks
    with torch.no_grad():
        hidden = [model.visual.ln_pre(clip._tokens(pixels))]
        for block in resblocks:
            hidden.append(clip._run([block], hidden[-1]))
        global_, vv, qk = dual_path_tokens(clip, pixels, (1, 2), 2)
        _, features, states = staged_dual_path(clip, pixels, (1, 2), 2)
    heads = resblocks[0].attn.num_heads
    for layer in (1, 2):
        np.testing.assert_allclose(qk[layer - 1].numpy(), hidden[layer][:, 1:].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(states[layer - 1].numpy(), hidden[layer].numpy(), rtol=1e-4, atol=1e-5)
        by_hand = _vv_by_hand(resblocks[layer - 1], hidden[layer - 1], heads)
        np.testing.assert_allclose(features[layer - 1][:, 1:].numpy(),  # 2 stages of one block: that block's V-V
                                   clip._project(torch.from_numpy(by_hand).float())[:, 1:].numpy(),
                                   rtol=1e-4, atol=1e-5)
    # DPAM over both blocks: the new path adds each block's V-V output to the embedded tokens, skipping the MLPs
    expected = hidden[0].double().numpy() + _vv_by_hand(resblocks[0], hidden[0], heads) + \
        _vv_by_hand(resblocks[1], hidden[1], heads)
    np.testing.assert_allclose(vv[1].numpy(), expected[:, 1:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(global_.numpy(), model.encode_image(pixels).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, params", [("clip_ad", dict(stages=2)),
                                          ("filo", dict(descriptions=["crack"], layers=(1, 2), dpam_depth=1))])
def test_clip_ad_and_filo_run_on_the_open_clip_backbone(tiny, images, name, params):
    _, clip = tiny
    detector = oodscope.create(name, model=clip, object_name="tile", **params).fit(images[:3].astype(np.float32))
    scores, maps = detector.score_and_map(images[3:].astype(np.float32))
    assert np.isfinite(scores).all() and maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    assert np.ptp(maps) > 0
